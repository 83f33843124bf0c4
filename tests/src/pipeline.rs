//! The whole chain for one test: broker → gateway → relay.

use std::collections::BTreeSet;
use std::ops::Range;

use crate::{
    Gateway, GatewayConfig, Mosquitto, MosquittoOptions, Publisher, PublisherOptions, Relay,
    TestDir, climate_readings, secs,
};

/// The gateway id the pipelines use.
pub const GATEWAY_ID: &str = "pi-1";
/// The token the relay knows [`GATEWAY_ID`] by.
pub const TOKEN: &str = "e2e-token-3f9a1c";

/// A broker, a relay that accepts gateway [`GATEWAY_ID`] with [`TOKEN`], and that gateway
/// subscribed to `org/#`. Fields drop in order: processes first, the directory (whose
/// drop prints the logs of a failed test) last.
pub struct Pipeline {
    pub gateway: Gateway,
    pub relay: Relay,
    pub mosquitto: Mosquitto,
    pub dir: TestDir,
}

impl Pipeline {
    /// Starts everything with defaults and waits until the gateway has subscribed.
    pub async fn start(name: &str) -> Pipeline {
        Self::start_with(name, MosquittoOptions::default(), |_| {}).await
    }

    /// Like [`Pipeline::start`], with broker options and a chance to change the gateway's
    /// config before it starts.
    pub async fn start_with(
        name: &str,
        options: MosquittoOptions,
        edit: impl FnOnce(&mut GatewayConfig),
    ) -> Pipeline {
        Self::start_in(name, options, |_, c| edit(c)).await
    }

    /// Like [`Pipeline::start_with`], the edit also given the test directory (e.g. to
    /// make a drop directory in it).
    pub async fn start_in(
        name: &str,
        options: MosquittoOptions,
        edit: impl FnOnce(&TestDir, &mut GatewayConfig),
    ) -> Pipeline {
        let dir = TestDir::new(name);
        let mosquitto = Mosquitto::start_with(&dir, options).await;
        let relay = Relay::start(&dir, &[(GATEWAY_ID, TOKEN)]).await;
        let mut config = GatewayConfig::new(GATEWAY_ID, TOKEN, &relay.url(), mosquitto.port());
        edit(&dir, &mut config);
        let gateway = Gateway::start_subscribed(&dir, config, &mosquitto).await;
        Pipeline {
            gateway,
            relay,
            mosquitto,
            dir,
        }
    }

    /// Publisher options with a client id unique to this test.
    pub fn publisher(&self) -> PublisherOptions {
        PublisherOptions {
            client_id: format!("e2e-pub-{}", self.mosquitto.port()),
            ..PublisherOptions::default()
        }
    }

    /// Publishes climate readings numbered `range` at QoS 1, asserts the broker
    /// acknowledged every one, and returns their numbers.
    pub async fn publish(&self, range: Range<u64>) -> BTreeSet<u64> {
        let count = (range.end - range.start) as usize;
        let report = Publisher::publish_all(
            self.mosquitto.port(),
            climate_readings(range),
            self.publisher(),
            secs(120),
        )
        .await;
        report.assert_all_acked(count);
        report.acked
    }
}
