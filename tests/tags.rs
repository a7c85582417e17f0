//! *(issue 15)* Tags, as in Hypeman's API: on create, on the record, as a
//! list filter, changed with `SetTags` (which signals `PropertiesChanged`),
//! kept across restarts, checked against Hypeman's rules; and `hypemanctl`'s
//! `--tag` and `tag`.

use crate::common;

use common::*;
use serde_json::Value;

fn tags_of(record: &Value) -> Value {
    record["tags"]["data"].clone()
}

#[test]
fn tags_on_create_list_filter_set_and_restart() {
    let Sim {
        bus,
        state,
        daemon: d,
    } = Sim::on(TestBus::start(), "l4.toml");
    let made = bus
        .manager(
            "Create",
            &[
                "a{sv}",
                "3",
                "pci_address",
                "s",
                "0000:a2:00.0",
                "name",
                "s",
                "gpu",
                "tags",
                "a{ss}",
                "2",
                "team",
                "ml",
                "env",
                "prod",
            ],
        )
        .unwrap();
    assert_eq!(
        tags_of(&made[1]),
        serde_json::json!({"team": "ml", "env": "prod"})
    );
    // Without a name: the default name; without tags: none.
    let plain = bus
        .manager(
            "Create",
            &["a{sv}", "1", "pci_address", "s", "0000:3b:00.0"],
        )
        .unwrap();
    assert_eq!(plain[1]["name"]["data"], "pci-0000-3b-00-0");
    assert_eq!(tags_of(&plain[1]), serde_json::json!({}));

    let by = |pairs: &[&str]| -> Vec<String> {
        let mut args = vec!["a{ss}".to_string(), (pairs.len() / 2).to_string()];
        args.extend(pairs.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        bus.manager("ListByTags", &args).unwrap()[0]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"]["data"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(by(&["team", "ml"]), ["gpu"]);
    assert_eq!(by(&["team", "ml", "env", "prod"]), ["gpu"]);
    assert_eq!(by(&["team", "ml", "env", "dev"]), Vec::<String>::new());
    assert_eq!(by(&["team", "ML"]), Vec::<String>::new());
    assert_eq!(by(&[]).len(), 2);

    // SetTags: one signal, with the new map.
    let path = made[0].as_str().unwrap().to_string();
    let mut signals = Signals::watch(&bus, Some(&path));
    let after = bus
        .manager(
            "SetTags",
            &["sa{ss}as", "gpu", "1", "owner", "ana", "1", "env"],
        )
        .unwrap();
    assert_eq!(
        tags_of(&after[0]),
        serde_json::json!({"team": "ml", "owner": "ana"})
    );
    let tags: std::collections::HashMap<String, String> = [("team", "ml"), ("owner", "ana")]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .into();
    let first = signals.wait_for(|s| matches!(s, Signal::Changed { .. }));
    assert!(
        signals.seen[first].sets(Some(&path), "Tags", tags),
        "one signal, with the new map: {:?}",
        signals.seen
    );

    // Hypeman's rules: refused, typed, nothing changed.
    for (set, why) in [
        (vec!["bad key!", "x"], "key"),
        (vec!["k", "caf\u{e9}"], "value"),
    ] {
        let out = bus.gdbus_call(
            PATH,
            &format!("{IFACE}.SetTags"),
            &["gpu", &format!("{{'{}': '{}'}}", set[0], set[1]), "@as []"],
        );
        assert_eq!(
            gdbus_error_name(&out),
            "org.hypeman.Devices.Error.InvalidArgument"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(why),
            "{out:?}"
        );
    }
    let out = bus.gdbus_call(
        PATH,
        &format!("{IFACE}.Create"),
        &["{'pci_address': <'0000:5e:00.0'>, 'tags': <{'k': 'v'}>, 'colour': <'red'>}"],
    );
    assert_eq!(
        gdbus_error_name(&out),
        "org.hypeman.Devices.Error.InvalidArgument"
    );

    // Kept across a restart; a file without tags (earlier versions) loads.
    drop(d);
    wait_name(&bus, NAME, false, None);
    let _d = Daemon::simulate(&bus, state.path(), "l4.toml");
    let got = bus.manager("Get", &["s", "gpu"]).unwrap();
    assert_eq!(
        tags_of(&got[0]),
        serde_json::json!({"team": "ml", "owner": "ana"})
    );
    let records = stored_records(state.path());
    let nic = records
        .iter()
        .find(|r| r["name"] == "pci-0000-3b-00-0")
        .unwrap();
    assert!(nic.get("tags").is_none(), "{nic}");
}

#[test]
fn hypemanctl_tags() {
    let Sim {
        bus,
        state: _state,
        daemon: _d,
    } = Sim::on(TestBus::start(), "l4.toml");
    let ok = |args: &[&str]| -> String {
        let out = bus.hypemanctl(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let doc: Value = serde_json::from_str(&ok(&[
        "--json",
        "register",
        "0000:a2:00.0",
        "--name",
        "gpu",
        "--tag",
        "team=ml",
        "--tag",
        "note=a=b",
    ]))
    .unwrap();
    assert_eq!(
        doc["tags"],
        serde_json::json!({"note": "a=b", "team": "ml"})
    );
    ok(&["register", "0000:3b:00.0"]);
    let list: Value = serde_json::from_str(&ok(&["--json", "list", "--tag", "team=ml"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["name"], "gpu");
    let text = ok(&["tag", "gpu", "env=prod", "--remove", "note"]);
    assert!(text.contains("tags: env=prod, team=ml"), "{text}");
    assert!(ok(&["get", "gpu"]).contains("tags: env=prod, team=ml"));
    let out = bus.hypemanctl(&["register", "0000:5e:00.0", "--tag", "novalue"]);
    assert_eq!(out.status.code(), Some(2));
}

/// *(issue 24)* A tag filter past Hypeman's limits (50 pairs, keys of 128
/// and values of 256 bytes) is `InvalidArgument` over D-Bus and 400 over
/// REST; one of half a million pairs (no authorization needed) leaves the
/// daemon's memory where it was once answered (before: the filter was
/// searched, and RSS went from 23 to 260 MB and stayed there).
#[test]
fn filters_past_the_tag_limits_are_refused_and_leave_no_memory_behind() {
    use std::io::{Read, Write};
    let bus = TestBus::start();
    let state = tempfile::tempdir().unwrap();
    let sock = state.path().join("api.sock");
    let f = fixture("l4.toml");
    let d = Daemon::start(
        &bus,
        state.path(),
        &[
            "--simulate",
            f.to_str().unwrap(),
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    );
    let pairs = |n: usize| -> Vec<String> {
        let mut args = vec!["a{ss}".to_string(), n.to_string()];
        for i in 0..n {
            args.extend([format!("k{i}"), "v".to_string()]);
        }
        args
    };
    let call = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        bus.manager("ListByTags", &args)
    };
    assert_eq!(call(pairs(50)).unwrap()[0], serde_json::json!([]));
    let e = call(pairs(51)).unwrap_err();
    assert!(e.contains("at most 50 pairs, not 51"), "{e}");
    let long_key = vec!["a{ss}".into(), "1".into(), "k".repeat(129), "v".into()];
    let e = call(long_key).unwrap_err();
    assert!(e.contains("keys have at most 128 bytes"), "{e}");
    let out = bus.gdbus_call(
        PATH,
        &format!("{IFACE}.ListByTags"),
        &[&format!("{{'k': '{}'}}", "v".repeat(257))],
    );
    assert_eq!(
        gdbus_error_name(&out),
        "org.hypeman.Devices.Error.InvalidArgument"
    );

    // REST: the same rule, and the query is not collected past it.
    let query: Vec<String> = (0..51).map(|i| format!("tags[k{i}]=v")).collect();
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    write!(
        s,
        "GET /devices?{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        query.join("&")
    )
    .unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    assert!(
        got.contains("invalid_request") && got.contains("at most 50"),
        "{got}"
    );

    // Half a million pairs, straight from a client library (busctl's
    // command line would not hold them).
    let pid = d.proc.pid();
    let before = rss_kib(pid);
    let filter: std::collections::BTreeMap<String, String> = (0..500_000)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let name = rt.block_on(async {
        let conn = zbus::connection::Builder::address(bus.address.as_str())
            .build()
            .await
            .unwrap();
        let r = conn
            .call_method(Some(NAME), PATH, Some(IFACE), "ListByTags", &filter)
            .await;
        match r {
            Err(zbus::Error::MethodError(name, _, _)) => name.to_string(),
            other => panic!("not refused: {other:?}"),
        }
    });
    assert_eq!(name, "org.hypeman.Devices.Error.InvalidArgument");
    drop(filter);
    // The decoded filter took over 100 MB; once answered, it is handed back.
    wait_until(|| rss_kib(pid) < before + 24 * 1024);
}
