//! The conformance suite against the DNS backend, reading a real `consul agent -dev`'s DNS
//! interface over TCP through a [`Gate`] (so that the outage scenario can cut it off). The
//! backend only discovers: instances are put where it finds them by the fixture, a Consul
//! client of the same agent, and the registration scenarios are skipped.
//!
//! Needs a `consul` binary: `eval "$(scripts/fetch-servers)"`.
use std::sync::Arc;
use std::time::Duration;

use waypost_conformance::consul_server::ConsulServer;
use waypost_conformance::gate::Gate;
use waypost_conformance::{async_trait, conformance_tests, Backend, Describes};
use waypost_consul::Consul;
use waypost_core::{Discovery, Registry};
use waypost_dns::{Dns, Protocol};

/// The DNS backend's backoff cap here: how long a watch waits at most between two questions
/// while the agent is cut off.
const BACKOFF_CAP: Duration = Duration::from_secs(1);

struct ConsulDns {
    server: ConsulServer,
    /// Between the DNS backend and the agent's DNS port (TCP).
    gate: Gate,
}

#[async_trait]
impl Backend for ConsulDns {
    fn name(&self) -> &'static str {
        "dns"
    }

    /// The fixture: a Consul client of the agent whose DNS interface the backend reads (not
    /// through the gate: a partition cuts the discovery off, not the registrations).
    fn registry(&self) -> Arc<dyn Registry> {
        let consul = Consul::builder()
            .address(self.server.addr())
            .retry_backoff(Duration::from_millis(50), Duration::from_secs(1))
            .build();
        match consul {
            Ok(consul) => Arc::new(consul),
            Err(e) => panic!("the fixture's Consul client: {e}"),
        }
    }

    fn discovery(&self) -> Arc<dyn Discovery> {
        let dns = Dns::builder()
            .server(self.gate.addr())
            .domain("consul")
            .protocol(Protocol::Tcp)
            .poll_interval(Duration::from_millis(150))
            .query_timeout(Duration::from_secs(1))
            .backoff(Duration::from_millis(50), BACKOFF_CAP)
            .build();
        match dns {
            Ok(dns) => Arc::new(dns),
            Err(e) => panic!("the DNS backend: {e}"),
        }
    }

    fn discovery_only(&self) -> Option<&'static str> {
        Some(
            "DNS has no registration: the fixture registers in Consul, whose DNS interface the \
             backend reads",
        )
    }

    fn describes(&self) -> Describes {
        Describes::Address
    }

    async fn restart(&self) -> Result<(), String> {
        // A polling watch sees only the outages that a poll falls into: keep the agent down for
        // several poll intervals (150 ms), as a real restart takes, before it comes back. -dev
        // forgets every registration; the fixture's handles register again by themselves.
        self.server.kill();
        tokio::time::sleep(Duration::from_millis(750)).await;
        self.server.restart().await;
        Ok(())
    }

    async fn partition(&self) -> Result<(), String> {
        self.gate.cut();
        Ok(())
    }

    async fn heal(&self) -> Result<(), String> {
        self.gate.mend();
        Ok(())
    }

    fn retry_period(&self) -> Duration {
        BACKOFF_CAP
    }

    fn expiry_bound(&self) -> Duration {
        // As for the Consul backend: Consul marks a TTL check critical a TTL after its last
        // pass; the rest is slack for a loaded machine.
        self.ttl() + Duration::from_secs(6)
    }
}

async fn start() -> ConsulDns {
    let server = ConsulServer::start().await;
    let gate = match Gate::start(server.dns_addr()).await {
        Ok(gate) => gate,
        Err(e) => panic!("cannot start a gate to the agent's DNS port: {e}"),
    };
    ConsulDns { server, gate }
}

conformance_tests!(start);
