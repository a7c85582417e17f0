//! Crash consistency: the daemon is killed with SIGKILL at random moments while
//! a client drives mixed Register/Delete/Attach/Detach calls. After every
//! restart the store parses, every acknowledged call is there, at most the one
//! call in flight is uncertain, and no device is left without a driver.

mod common;

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use common::*;
use hypeman_api::BusChoice;
use hypemanctl::{Client, ClientError};

const DEVICES: usize = 16;

/// A small xorshift generator: the run is random but printed, so a failure can
/// be replayed with HYPEMAN_CRASH_SEED.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Dev {
    name: String,
    attached: Option<String>,
}

#[derive(Debug, Clone)]
enum Op {
    Register(String, String),
    Delete(String),
    Attach(String, String),
    Detach(String),
}

impl Op {
    fn address(&self, model: &HashMap<String, Dev>) -> Option<String> {
        match self {
            Op::Register(a, _) => Some(a.clone()),
            Op::Delete(n) | Op::Attach(n, _) | Op::Detach(n) => model
                .iter()
                .find(|(_, d)| &d.name == n)
                .map(|(a, _)| a.clone()),
        }
    }
}

/// The registry as the daemon reports it: address -> (name, attachment).
async fn observed(client: &Client) -> HashMap<String, Dev> {
    client
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|d| {
            (
                d.pci_address,
                Dev {
                    name: d.name,
                    attached: d.attached_to,
                },
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing() {
    let seed = std::env::var("HYPEMAN_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("HYPEMAN_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let bus = TestBus::start();
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host.toml");
    std::fs::write(&host, hypeman_bench::generated_host(DEVICES)).unwrap();
    let kernel = dir.path().join("kernel.json");
    let state = dir.path().join("state");
    let args = [
        "--simulate",
        host.to_str().unwrap(),
        "--simulate-state",
        kernel.to_str().unwrap(),
    ];
    let addresses: Vec<String> = (0..DEVICES).map(hypeman_bench::pci_address).collect();
    // Bridges (every 16th from 15) are left alone: vfio-pci does not take them on real hosts.
    let usable: Vec<String> = addresses
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 16 != 15)
        .map(|(_, a)| a.clone())
        .collect();

    let mut model: HashMap<String, Dev> = HashMap::new();
    let (mut ops, mut acked, mut kills, mut uncertain_seen) = (0, 0, 0, 0);
    while ops < 500 || kills < 20 {
        let d = Daemon::start(&bus, &state, &args);
        let client = Client::connect(&BusChoice::Address(bus.address.clone()))
            .await
            .unwrap();

        // Check the restart against everything acknowledged so far.
        let seen = observed(&client).await;
        assert_eq!(
            seen, model,
            "after kill {kills}: the registry differs from what was acknowledged"
        );
        // The files say the same (the snapshot and the journal's whole writes).
        assert_eq!(stored_records(&state).len(), model.len());
        for a in client.available().await.unwrap() {
            assert!(
                a.current_driver.is_some(),
                "after kill {kills}: {} is left without a driver",
                a.pci_address
            );
            if let Some(m) = model.get(&a.pci_address) {
                if m.attached.is_some() {
                    assert_eq!(
                        a.current_driver.as_deref(),
                        Some("vfio-pci"),
                        "{} is attached but not on vfio-pci",
                        a.pci_address
                    );
                }
            }
        }

        // Kill at a random moment while calls are going on.
        let pid = d.proc.pid();
        let delay = Duration::from_millis(20 + rng.below(150));
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        });
        // Calls go on until one fails because the daemon is gone: that one was
        // in flight at the kill.
        let in_flight: (Op, Option<String>) = loop {
            let addr = usable[rng.below(usable.len() as u64) as usize].clone();
            let existing = model.get(&addr).cloned();
            let op = match (&existing, rng.below(4)) {
                (None, _) => Op::Register(addr.clone(), format!("d{}", rng.below(1_000_000))),
                (Some(dv), 0) => Op::Delete(dv.name.clone()),
                (Some(dv), 1 | 2) => Op::Attach(dv.name.clone(), format!("vm-{}", rng.below(3))),
                (Some(dv), _) => Op::Detach(dv.name.clone()),
            };
            let target = op.address(&model);
            let result = match &op {
                Op::Register(a, n) => client.register(a, n).await.map(|_| ()),
                Op::Delete(n) => client.delete(n).await,
                Op::Attach(n, vm) => client.attach(n, vm).await.map(|_| ()),
                Op::Detach(n) => client.detach(n).await.map(|_| ()),
            };
            ops += 1;
            match result {
                Ok(()) => {
                    acked += 1;
                    let a = target.clone().unwrap();
                    match &op {
                        Op::Register(_, n) => {
                            model.insert(
                                a,
                                Dev {
                                    name: n.clone(),
                                    attached: None,
                                },
                            );
                        }
                        Op::Delete(_) => {
                            model.remove(&a);
                        }
                        Op::Attach(_, vm) => model.get_mut(&a).unwrap().attached = Some(vm.clone()),
                        Op::Detach(_) => model.get_mut(&a).unwrap().attached = None,
                    }
                }
                // Refusals are answers too: nothing changed.
                Err(
                    ClientError::InUse(_)
                    | ClientError::NameTaken(_)
                    | ClientError::AlreadyRegistered(_),
                ) => acked += 1,
                Err(_) => break (op, target),
            }
        };
        killer.join().unwrap();
        d.kill9(&bus);
        kills += 1;

        // The call in flight may or may not have happened: take the daemon's
        // word for that one device, and only that one.
        if let (op, Some(addr)) = in_flight {
            let d = Daemon::start(&bus, &state, &args);
            let client = Client::connect(&BusChoice::Address(bus.address.clone()))
                .await
                .unwrap();
            let seen = observed(&client).await;
            for (a, want) in &model {
                if *a != addr {
                    assert_eq!(
                        seen.get(a),
                        Some(want),
                        "acknowledged state of {a} lost (in flight: {op:?})"
                    );
                }
            }
            for a in seen.keys() {
                assert!(
                    model.contains_key(a) || *a == addr,
                    "{a} appeared from nowhere"
                );
            }
            let before = model.get(&addr).cloned();
            match seen.get(&addr) {
                Some(dv) => {
                    model.insert(addr.clone(), dv.clone());
                }
                None => {
                    model.remove(&addr);
                }
            }
            if model.get(&addr) != before.as_ref() {
                uncertain_seen += 1;
            }
            d.kill9(&bus);
        }
    }
    eprintln!("{ops} calls, {acked} answered, {kills} SIGKILLs, {uncertain_seen} in-flight calls that took effect");
}
