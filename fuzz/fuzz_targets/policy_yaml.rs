//! parse_documents_lenient (valid and refused resources alike) + Snapshot::build + decisions
//! (TCP and HTTP, so path templates and conditions run) on arbitrary text: never panics.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use outrigger_policy::{
    HttpAttrs, PolicyOptions, Request, Snapshot, Workload, parse_documents_lenient,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let resources = parse_documents_lenient("fuzz.yaml", text);
    let workload = Workload {
        namespace: "default".into(),
        labels: BTreeMap::from([("app".to_string(), "web".to_string())]),
    };
    if let Ok(snap) = Snapshot::build(&resources, &workload, &PolicyOptions::default()) {
        let _ = snap.mtls_mode(8080);
        let _ = snap.refused().len() + snap.warnings().len();
        let req = Request::tcp([10, 0, 0, 1].into(), [10, 0, 0, 2].into(), 8080)
            .with_principal("cluster.local/ns/default/sa/x");
        let _ = snap.authorize(&req);
        let headers = [("x-a", "b")];
        for path in ["/", "/a/b/c", "/a//b=c", "/x/%41/y?q=1"] {
            let http = req.with_http(HttpAttrs {
                method: "GET",
                host: "web",
                path,
                headers: &headers,
            });
            let _ = snap.authorize(&http);
        }
    }
});
