//! Several real Consul datacenters joined over the WAN, one `consul agent -dev` each, on
//! loopback: for cross-datacenter discovery (`?dc=`) and datacenter outages.
//!
//! Each agent is a server of its own datacenter (`-datacenter <name>`) on free ports of
//! 127.0.0.1 (HTTP, DNS, Serf LAN and WAN, server RPC; gRPC off), started like
//! [`ConsulServer`](crate::consul_server::ConsulServer)'s (same binary lookup, same process
//! guard: every agent is killed on drop). Once all have a leader, each joins the first one's
//! Serf WAN port (`PUT /v1/agent/join/<addr>?wan=1`, what `consul join -wan` does), and
//! [`start`](ConsulDatacenters::start) returns when every agent lists every datacenter and
//! answers a query for each other one. [`ConsulDatacenters`]'s example starts two.

use std::fmt;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::consul_server::{consul_bin, Agent};

/// How long the agents may take to see each other over the WAN (about 0.2 s when idle).
const JOIN_BOUND: Duration = Duration::from_secs(60);
/// How often the join is asked again while the datacenters do not see each other yet.
const REJOIN_EVERY: Duration = Duration::from_secs(2);

/// Real Consul datacenters, one single-node `-dev` agent each, joined over the WAN.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use waypost_conformance::consul_wan::ConsulDatacenters;
///
/// let dcs = ConsulDatacenters::start(&["dc1", "dc2"]).await;
/// assert_eq!(dcs.names(), ["dc1", "dc2"]);
/// // dc2's services, asked of dc1's agent:
/// let via_dc1 = format!("{}/v1/health/service/consul?dc=dc2", dcs.http_url("dc1"));
/// assert!(reqwest::get(&via_dc1).await?.status().is_success());
///
/// dcs.stop("dc2"); // a datacenter outage: dc1 goes on, its queries for dc2 fail
/// assert!(!reqwest::get(&via_dc1).await?.status().is_success());
/// # Ok(())
/// # }
/// ```
pub struct ConsulDatacenters {
    dcs: Vec<(String, Agent)>,
}

impl fmt::Debug for ConsulDatacenters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (name, agent) in &self.dcs {
            m.entry(name, &agent.addr());
        }
        m.finish()
    }
}

impl ConsulDatacenters {
    /// Starts one agent per name, a datacenter of that name each, joins them over the WAN, and
    /// returns when every agent lists every datacenter (`GET /v1/catalog/datacenters`) and
    /// answers a query for each other datacenter (`GET /v1/health/service/consul?dc=<other>`
    /// gives 200).
    ///
    /// # Panics
    /// When `names` is empty, holds a duplicate or a name that is not `[A-Za-z0-9_-]+`, when no
    /// `consul` binary is found, or when the agents do not come up or do not see each other
    /// within 60 s (the message says what was missing, with the agents' logs).
    pub async fn start(names: &[&str]) -> ConsulDatacenters {
        assert!(
            !names.is_empty(),
            "ConsulDatacenters::start needs a datacenter name"
        );
        for (i, name) in names.iter().enumerate() {
            assert!(
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "{name:?} is not a datacenter name (letters, digits, '-' and '_')"
            );
            assert!(
                !names[..i].contains(name),
                "datacenter {name:?} is named twice"
            );
        }
        let bin = consul_bin();
        let agents = futures::future::join_all(names.iter().map(|name| {
            let bin = bin.clone();
            async move {
                let mut last_error = String::new();
                // Free ports are picked by binding port 0 and releasing it: another process may
                // grab one in between, so try a few sets.
                for _ in 0..3 {
                    let agent = Agent::new(bin.clone());
                    match agent.spawn_and_wait(command(&agent, name)).await {
                        Ok(()) => return Ok(agent),
                        Err(e) => last_error = e,
                    }
                }
                Err(format!("the agent of {name} did not start: {last_error}"))
            }
        }))
        .await;
        let mut dcs = Vec::with_capacity(names.len());
        let mut failures = Vec::new();
        for (name, agent) in names.iter().zip(agents) {
            match agent {
                Ok(agent) => dcs.push(((*name).to_owned(), agent)),
                Err(e) => failures.push(e),
            }
        }
        // The agents that did start are killed when `dcs` goes.
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        let this = ConsulDatacenters { dcs };
        if let Err(e) = this.join_wan(None).await {
            panic!("consul datacenters {names:?} did not join over the WAN: {e}");
        }
        this
    }

    /// The datacenters' names, in the order given to [`start`](Self::start).
    pub fn names(&self) -> Vec<&str> {
        self.dcs.iter().map(|(name, _)| name.as_str()).collect()
    }

    /// The HTTP address of `dc`'s agent, `127.0.0.1:<port>` (the same after
    /// [`start_again`](Self::start_again)).
    ///
    /// # Panics
    /// When `dc` is not one of the datacenters.
    pub fn addr(&self, dc: &str) -> String {
        self.agent(dc).addr()
    }

    /// The HTTP base URL of `dc`'s agent, `http://127.0.0.1:<port>`.
    ///
    /// # Panics
    /// When `dc` is not one of the datacenters.
    pub fn http_url(&self, dc: &str) -> String {
        self.agent(dc).http_url()
    }

    /// Kills `dc`'s agent (SIGKILL, as a crash or the loss of the datacenter would) and waits
    /// for it to exit. The other agents go on; queries for `dc` through them fail. Idempotent.
    ///
    /// # Panics
    /// When `dc` is not one of the datacenters.
    pub fn stop(&self, dc: &str) {
        self.agent(dc).kill();
    }

    /// Starts `dc`'s agent again on the same ports (killing it first if it runs), joins it to
    /// the running datacenters over the WAN, and returns when it and they answer queries for
    /// each other. A `-dev` agent comes back empty: every registration in `dc` is gone.
    ///
    /// # Panics
    /// When `dc` is not one of the datacenters, or its agent does not come back and re-join
    /// within 60 s.
    pub async fn start_again(&self, dc: &str) {
        let agent = self.agent(dc);
        if let Err(e) = agent.respawn(|| command(agent, dc)).await {
            panic!("the consul agent of {dc} did not come back: {e}");
        }
        if let Err(e) = self.join_wan(Some(dc)).await {
            panic!("the consul agent of {dc} did not re-join the WAN: {e}");
        }
    }

    /// [`stop`](Self::stop), then [`start_again`](Self::start_again).
    pub async fn restart(&self, dc: &str) {
        self.stop(dc);
        self.start_again(dc).await;
    }

    fn agent(&self, dc: &str) -> &Agent {
        match self.dcs.iter().find(|(name, _)| name == dc) {
            Some((_, agent)) => agent,
            None => panic!(
                "no datacenter {dc:?} in this harness (it has {:?})",
                self.names()
            ),
        }
    }

    /// Joins the running agents over the WAN and waits until they see each other: `joining`
    /// (a restarted datacenter) joins one other running agent; with `None` every agent joins
    /// the first one, and each must also list every datacenter.
    async fn join_wan(&self, joining: Option<&str>) -> Result<(), String> {
        let running: Vec<&(String, Agent)> =
            self.dcs.iter().filter(|(_, a)| a.is_running()).collect();
        let http = reqwest::Client::new();
        let deadline = Instant::now() + JOIN_BOUND;
        let mut next_join = Instant::now();
        loop {
            if Instant::now() >= next_join {
                // Asked again now and then: a join can be lost while an agent settles.
                next_join = Instant::now() + REJOIN_EVERY;
                for (from, target) in join_pairs(&running, joining) {
                    let url = format!(
                        "{}/v1/agent/join/127.0.0.1:{}?wan=1",
                        from.http_url(),
                        target.ports.serf_wan
                    );
                    let _ = http.put(url).timeout(Duration::from_secs(2)).send().await;
                }
            }
            let missing = self.missing(&http, &running, joining.is_none()).await;
            if missing.is_empty() {
                return Ok(());
            }
            if let Some((name, agent)) = running.iter().find(|(_, a)| !a.is_running()) {
                return Err(format!(
                    "the agent of {name} exited; its log:\n{}",
                    agent.log_tail()
                ));
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = running
                    .iter()
                    .map(|(name, agent)| format!("--- log of {name}:\n{}", agent.log_tail()))
                    .collect();
                return Err(format!(
                    "not within {JOIN_BOUND:?}: {}\n{}",
                    missing.join("; "),
                    logs.join("\n")
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What the running agents do not see of each other yet (empty when all is well).
    async fn missing(
        &self,
        http: &reqwest::Client,
        running: &[&(String, Agent)],
        all_listed: bool,
    ) -> Vec<String> {
        let mut missing = Vec::new();
        for (name, agent) in running {
            if all_listed {
                let url = format!("{}/v1/catalog/datacenters", agent.http_url());
                let listed: Vec<String> =
                    match http.get(url).timeout(Duration::from_secs(2)).send().await {
                        Ok(resp) => resp.json().await.unwrap_or_default(),
                        Err(_) => Vec::new(),
                    };
                let absent: Vec<&str> = self
                    .names()
                    .into_iter()
                    .filter(|dc| !listed.iter().any(|l| l == dc))
                    .collect();
                if !absent.is_empty() {
                    missing.push(format!(
                        "{name} lists {listed:?}, not {absent:?} (GET /v1/catalog/datacenters)"
                    ));
                }
            }
            for (other, _) in running.iter().filter(|(o, _)| o != name) {
                let url = format!("{}/v1/health/service/consul?dc={other}", agent.http_url());
                let status = match http.get(url).timeout(Duration::from_secs(5)).send().await {
                    Ok(resp) => resp.status().to_string(),
                    Err(e) => e.to_string(),
                };
                if status != "200 OK" {
                    missing.push(format!(
                        "{name} answers a query for {other} with {status} \
                         (GET /v1/health/service/consul?dc={other})"
                    ));
                }
            }
        }
        missing
    }
}

/// Who joins whom: `joining` joins the first other running agent; with `None` every running
/// agent but the first joins the first.
fn join_pairs<'a>(
    running: &[&'a (String, Agent)],
    joining: Option<&str>,
) -> Vec<(&'a Agent, &'a Agent)> {
    match joining {
        Some(dc) => {
            let me = running.iter().find(|(name, _)| name == dc);
            let other = running.iter().find(|(name, _)| name != dc);
            match (me, other) {
                (Some((_, me)), Some((_, other))) => vec![(me, other)],
                _ => Vec::new(),
            }
        }
        None => match running.split_first() {
            Some(((_, first), rest)) => rest.iter().map(|(_, a)| (a, first)).collect(),
            None => Vec::new(),
        },
    }
}

/// The agent of datacenter `dc`: node `waypost-<dc>`.
fn command(agent: &Agent, dc: &str) -> Command {
    agent.command(&format!("waypost-{dc}"), Some(dc))
}
