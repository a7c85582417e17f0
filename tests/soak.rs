//! The soak: 64 clients making mixed calls for 60 s (SOAK_SECS to change it)
//! while devices are unplugged and plugged in parallel. Counts errors, the p99
//! latency and the daemon's RSS at the start (after a warm-up) and the end.
//! Ignored in the quick suite; `.ci/run` runs it (`--include-ignored`).

use crate::common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hypeman_api::BusChoice;
use hypeman_bench::pci_address;
use hypemanctl::{Client, ClientError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "60 s; run by .ci/run"]
async fn soak_64_clients_with_hotplug() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let bus = TestBus::start_sim();
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host.toml");
    std::fs::write(&host, hypeman_bench::generated_host(256)).unwrap();
    let d = Daemon::start(
        &bus,
        &dir.path().join("state"),
        &["--simulate", host.to_str().unwrap()],
    );
    // RUST_LOG=debug would make the log the biggest cost of the soak.
    let addr = BusChoice::Address(bus.address.clone());

    let stop = Arc::new(AtomicBool::new(false));
    // Hotplug in parallel on devices no client owns (200..232, registered and bound).
    let admin = Client::connect(&addr).await.unwrap();
    for i in 200..232 {
        if i % 16 == 15 {
            continue;
        }
        admin
            .register(&pci_address(i), &format!("hp-{i}"))
            .await
            .unwrap();
        admin.bind(&format!("hp-{i}")).await.unwrap();
    }
    let plugger = {
        let stop = stop.clone();
        let conn = addr.builder().build().await.unwrap();
        tokio::spawn(async move {
            let mut events = 0u64;
            let mut i = 200;
            while !stop.load(Ordering::Relaxed) {
                let a = pci_address(i);
                for m in ["Unplug", "Plug"] {
                    conn.call_method(
                        Some(NAME),
                        "/org/hypeman/Simulator",
                        Some("org.hypeman.Simulator1"),
                        m,
                        &(a.as_str(),),
                    )
                    .await
                    .unwrap();
                    events += 1;
                }
                i = if i >= 231 { 200 } else { i + 1 };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            events
        })
    };

    let clients: Vec<_> = (0..64)
        .map(|c| {
            let stop = stop.clone();
            let addr = addr.clone();
            tokio::spawn(async move {
                let client = Client::connect(&addr).await.unwrap();
                let mine = [c * 3, c * 3 + 1].map(|i| if i % 16 == 15 { i + 1 } else { i });
                let names: Vec<String> = mine.iter().map(|i| format!("c{c}-{i}")).collect();
                let (mut lat, mut errors, mut calls) = (Vec::new(), 0u64, 0u64);
                let mut step = c;
                while !stop.load(Ordering::Relaxed) {
                    step += 1;
                    let k = step % mine.len();
                    let (a, n) = (pci_address(mine[k]), &names[k]);
                    let t = Instant::now();
                    let r = match step % 9 {
                        0 => client.register(&a, n).await.map(|_| ()),
                        1 => client.get(n).await.map(|_| ()),
                        2 => client.bind(n).await.map(|_| ()),
                        3 => client.attach(n, &format!("vm-{c}")).await.map(|_| ()),
                        4 => client.list().await.map(|_| ()),
                        5 => client.detach(n).await.map(|_| ()),
                        6 => client.unbind(n).await.map(|_| ()),
                        7 => client.available().await.map(|_| ()),
                        _ => client.delete(n).await,
                    };
                    lat.push(t.elapsed());
                    calls += 1;
                    match r {
                        Ok(()) => {}
                        // Answers about the state the random walk is in are not errors.
                        Err(
                            ClientError::NotFound(_)
                            | ClientError::AlreadyRegistered(_)
                            | ClientError::InUse(_),
                        ) => {}
                        Err(e) => {
                            errors += 1;
                            eprintln!("client {c}: {e}");
                        }
                    }
                }
                (lat, errors, calls)
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_secs(5.min(secs / 4 + 1))).await;
    let rss_start = rss_kib(d.proc.pid());
    tokio::time::sleep(Duration::from_secs(
        secs.saturating_sub(5.min(secs / 4 + 1)),
    ))
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let (mut errors, mut calls) = (0, 0);
    for c in clients {
        let (l, e, n) = c.await.unwrap();
        all.extend(l);
        errors += e;
        calls += n;
    }
    let events = plugger.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_end = rss_kib(d.proc.pid());
    all.sort();
    let p99 = all[all.len() * 99 / 100];
    eprintln!(
        "soak {secs} s: {calls} calls, {errors} errors, p99 {p99:?}, {events} hotplug events, RSS {rss_start} KiB -> {rss_end} KiB"
    );
    assert_eq!(errors, 0);
    assert!(
        rss_end * 10 <= rss_start * 11,
        "RSS grew from {rss_start} to {rss_end} KiB"
    );
    // Afterwards every hotplugged device is back on vfio-pci.
    for i in 200..232 {
        if i % 16 == 15 {
            continue;
        }
        wait_until(|| bus.host_driver(&pci_address(i)).as_deref() == Some("vfio-pci"));
    }
}
