//! The test control plane runs Jobs: kube-controller-manager creates the pod, kube-scheduler
//! binds it to the kwok node, kwok runs it to completion, and the Job completes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shapeblock_test_support as support;

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::wait::{Condition, await_condition};
use support::TestNamespace;

fn job_complete() -> impl Condition<Job> {
    |job: Option<&Job>| {
        job.and_then(|j| j.status.as_ref())
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Complete" && c.status == "True")
            })
    }
}

#[tokio::test]
async fn a_job_runs_to_completion() {
    support::jobs().await;
    let client = support::client().await;
    let ns = TestNamespace::new("jobs").await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns.name);
    let job: Job = serde_json::from_value(serde_json::json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "hello"},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "main", "image": "busybox:1.36", "args": ["true"]}]
            }}
        }
    }))
    .unwrap();
    jobs.create(&PostParams::default(), &job).await.unwrap();
    let done = await_condition(jobs.clone(), "hello", job_complete());
    tokio::time::timeout(Duration::from_secs(90), done)
        .await
        .expect("Job did not complete within 90s")
        .unwrap();

    let job = jobs.get("hello").await.unwrap();
    assert_eq!(job.status.as_ref().and_then(|s| s.succeeded), Some(1));
    let pods: Api<Pod> = Api::namespaced(client, &ns.name);
    let list = pods
        .list(&ListParams::default().labels("job-name=hello"))
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1);
    let pod = &list.items[0];
    assert_eq!(
        pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        Some("kwok-node-0")
    );
    assert_eq!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded")
    );
}
