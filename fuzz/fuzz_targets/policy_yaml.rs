//! parse_documents + Snapshot::build + one decision on arbitrary text: never panics.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use outrigger_policy::{PolicyOptions, Request, Snapshot, Workload, parse_documents};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(resources) = parse_documents("fuzz.yaml", text) else {
        return;
    };
    let workload = Workload {
        namespace: "default".into(),
        labels: BTreeMap::from([("app".to_string(), "web".to_string())]),
    };
    if let Ok(snap) = Snapshot::build(&resources, &workload, &PolicyOptions::default()) {
        let _ = snap.mtls_mode(8080);
        let req = Request::tcp([10, 0, 0, 1].into(), [10, 0, 0, 2].into(), 8080)
            .with_principal("cluster.local/ns/default/sa/x");
        let _ = snap.authorize(&req);
    }
});
