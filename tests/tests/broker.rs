//! The broker restarts under the gateway: with persistence it keeps what it queued for a
//! stopped gateway; without, it forgets the gateway's session and the gateway must
//! subscribe again.

use pigeon_e2e::{MosquittoOptions, Pipeline, secs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_broker_restart_keeps_readings_queued_for_a_stopped_gateway() {
    let options = MosquittoOptions {
        persistence: true,
        ..MosquittoOptions::default()
    };
    let mut p = Pipeline::start_with("broker-persistence", options, |_| {}).await;
    let mut expected = p.publish(0..1_000).await;
    p.relay.wait_for_readings("n", &expected, secs(60)).await;

    // Gateway stopped: the broker queues for its persistent session, saves on SIGTERM,
    // and has the queue back after the restart.
    p.gateway.stop().await;
    expected.extend(p.publish(1_000..4_000).await);
    p.mosquitto.stop().await;
    p.mosquitto.restart().await;
    p.gateway.restart();

    p.relay
        .assert_delivered_exactly_once(&expected, secs(120))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_subscribes_again_when_the_broker_forgot_its_session() {
    let mut p = Pipeline::start("broker-forgot-session").await;
    let client_id = p.gateway.config().effective_client_id();
    let mut expected = p.publish(0..1_000).await;
    p.relay.wait_for_readings("n", &expected, secs(60)).await;

    // No persistence: the restarted broker knows nothing of the gateway's subscription.
    p.mosquitto.kill();
    p.mosquitto.restart().await;
    p.mosquitto
        .wait_for_subscriptions(&client_id, "org/#", 2, secs(60))
        .await;
    expected.extend(p.publish(1_000..2_000).await);

    p.relay
        .assert_delivered_exactly_once(&expected, secs(120))
        .await;
    p.gateway.proc().assert_running();
}
