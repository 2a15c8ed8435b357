//! Scenario files: what network to simulate, how nodes join, and which faults happen when.
//!
//! Every table denies unknown keys, so a typo is an error naming the key instead of a silently ignored setting.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(default)]
    pub seed: u64,
    pub duration_s: f64,
    #[serde(default)]
    pub network: Network,
    pub nodes: Nodes,
    #[serde(default)]
    pub overlay: OverlayTuning,
    /// A fixed switch topology replacing the geographic latency model (VineIO's evaluation networks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<Topology>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<ScenarioEvent>,
    /// Services, instances, queries and churn (see `route_load`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<crate::route_load::RoutesScenario>,
    /// The closest-instance experiment (see `experiment`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<crate::experiment::ClosestExperiment>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    #[serde(default = "defaults::base_latency_ms")]
    pub base_latency_ms: f64,
    /// Signal speed: 100 km per ms is a fair figure for fibre plus routing detours.
    #[serde(default = "defaults::km_per_ms")]
    pub km_per_ms: f64,
    /// Uniform extra delay in `[0, jitter_ms)` per message.
    #[serde(default)]
    pub jitter_ms: f64,
    /// Probability that a message is lost.
    #[serde(default)]
    pub loss: f64,
}

impl Default for Network {
    fn default() -> Self {
        Self {
            base_latency_ms: defaults::base_latency_ms(),
            km_per_ms: defaults::km_per_ms(),
            jitter_ms: 0.0,
            loss: 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nodes {
    pub count: usize,
    /// `[lat_min, lon_min, lat_max, lon_max]`; positions are drawn uniformly inside.
    #[serde(default = "defaults::region")]
    pub region: [f64; 4],
    /// Node 0 starts the overlay at time 0; the others join one by one, evenly spread over this time.
    #[serde(default)]
    pub join_over_s: f64,
    /// How long a leaving node keeps running (to hand its role over) before it is gone.
    #[serde(default = "defaults::leave_grace_s")]
    pub leave_grace_s: f64,
    /// Nodes `0..bootstrap` are every node's bootstrap list (retried when detached or islanded), like the
    /// well-known addresses given to `agent join`.
    #[serde(default)]
    pub bootstrap: usize,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlayTuning {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_children: Option<usize>,
    /// Cells per side of the capacity grids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid_size: Option<u16>,
    /// Reports resend unchanged grids, and parents send small changes, every this many heartbeats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid_refresh: Option<u32>,
    /// A coordinator rebuilds its children's outside grid at most every this many heartbeats while its parent's
    /// grids keep changing (default 5; 0: at every change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid_outside_every: Option<u32>,
    /// The range machine subnets come from, e.g. "10.0.0.0/8" (default 10.16.0.0/12, which holds about 15,000
    /// machines of /26: larger fleets need a larger range or smaller machine subnets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform_range: Option<ipnet::Ipv4Net>,
    /// Prefix length of machine subnets (default 26).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_prefix: Option<u8>,
}

/// A binary tree of switches, `levels` deep (level 0 is one switch), every link `hop_latency_ms` long,
/// as in VineIO's topologies A-D. Hosts hang off switches by one more link each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    pub kind: TopologyKind,
    pub levels: u32,
    #[serde(default = "defaults::hop_latency_ms")]
    pub hop_latency_ms: f64,
    /// Which switches get hosts: every switch, or only the bottom level (so host distances are multiples of 2 hops).
    #[serde(default)]
    pub hosts_on: HostPlacement,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopologyKind {
    BinaryTree,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostPlacement {
    #[default]
    AllSwitches,
    Leaves,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioEvent {
    pub at_s: f64,
    pub kind: EventKind,
    /// For crash, restart and leave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    /// For partition: nodes west of this longitude cannot talk to nodes east of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_lon: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Crash,
    Restart,
    Leave,
    Partition,
    Heal,
}

/// Which nodes an event hits. Written in scenario files as `"root"`, `"coordinators:3"`, `"random:5"`, `"all"`,
/// or a node index (number or string).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The live root (for restart: nodes that were root when they crashed).
    Root,
    /// This many coordinators (not the root), chosen at random.
    Coordinators(usize),
    Random(usize),
    All,
    Index(usize),
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let count = |n: &str| n.parse::<usize>().map_err(|_| format!("bad count {n:?} in target {s:?}"));
        let unknown = || {
            format!("unknown target {s:?}: expected \"root\", \"all\", \"coordinators:N\", \"random:N\" or an index")
        };
        match s.split_once(':') {
            None if s == "root" => Ok(Target::Root),
            None if s == "all" => Ok(Target::All),
            None => s.parse().map(Target::Index).map_err(|_| unknown()),
            Some(("coordinators", n)) => count(n).map(Target::Coordinators),
            Some(("random", n)) => count(n).map(Target::Random),
            Some(_) => Err(unknown()),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Root => write!(f, "root"),
            Target::All => write!(f, "all"),
            Target::Coordinators(n) => write!(f, "coordinators:{n}"),
            Target::Random(n) => write!(f, "random:{n}"),
            Target::Index(i) => write!(f, "{i}"),
        }
    }
}

impl Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Index(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Index(i) => usize::try_from(i).map(Target::Index).map_err(serde::de::Error::custom),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

mod defaults {
    pub fn base_latency_ms() -> f64 {
        2.0
    }
    pub fn km_per_ms() -> f64 {
        100.0
    }
    pub fn region() -> [f64; 4] {
        [35.0, -10.0, 60.0, 30.0]
    }
    pub fn leave_grace_s() -> f64 {
        5.0
    }
    pub fn hop_latency_ms() -> f64 {
        5.0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    // The cause is the error's source, which `{:#}` prints after the message.
    #[error("cannot read scenario {path}")]
    Read { path: String, source: std::io::Error },
    #[error("scenario {path}: {message}")]
    Parse { path: String, message: String },
    #[error("scenario {path}: `{key}` {problem}")]
    Invalid { path: String, key: String, problem: String },
}

impl Scenario {
    pub fn from_file(path: &std::path::Path) -> Result<Self, ScenarioError> {
        let name = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| ScenarioError::Read { path: name.clone(), source })?;
        Self::from_toml(&text, &name)
    }

    /// Parses and validates; `origin` names the source in error messages.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ScenarioError> {
        let scenario: Scenario = toml::from_str(text)
            .map_err(|e| ScenarioError::Parse { path: origin.to_string(), message: e.to_string() })?;
        scenario.validate().map_err(|(key, problem)| ScenarioError::Invalid {
            path: origin.to_string(),
            key,
            problem,
        })?;
        Ok(scenario)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a scenario always serialises to TOML")
    }

    /// Checks values serde cannot: ranges and which fields each event kind needs. Errors name the key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, problem: &str| Err((key.to_string(), problem.to_string()));
        let finite_nonneg = |v: f64| v.is_finite() && v >= 0.0;
        if !(self.duration_s.is_finite() && self.duration_s > 0.0) {
            return bad("duration_s", "must be a positive number of seconds");
        }
        let n = &self.network;
        if !finite_nonneg(n.base_latency_ms) {
            return bad("network.base_latency_ms", "must be >= 0");
        }
        if !(n.km_per_ms.is_finite() && n.km_per_ms > 0.0) {
            return bad("network.km_per_ms", "must be > 0");
        }
        if !finite_nonneg(n.jitter_ms) {
            return bad("network.jitter_ms", "must be >= 0");
        }
        if !(0.0..=1.0).contains(&n.loss) {
            return bad("network.loss", "must be between 0 and 1");
        }
        if self.nodes.count == 0 {
            return bad("nodes.count", "must be at least 1");
        }
        if self.overlay.grid_size.is_some_and(|g| g == 0 || g > canopy_policies::MAX_GRID_SIZE) {
            return bad("overlay.grid_size", "must be between 1 and 64");
        }
        if self.overlay.grid_refresh == Some(0) {
            return bad("overlay.grid_refresh", "must be at least 1");
        }
        if let Some(range) = self.overlay.platform_range {
            let services = canopy_overlay::routes::pool::SERVICE_IP_RANGE;
            if range.trunc() != range || !range.contains(&services) || !(8..=15).contains(&range.prefix_len()) {
                return bad(
                    "overlay.platform_range",
                    "must be a network address (host bits zero) of /8../15 holding 10.30.0.0/16",
                );
            }
        }
        if let Some(prefix) = self.overlay.machine_prefix
            && !(22..=30).contains(&prefix)
        {
            return bad("overlay.machine_prefix", "must be between 22 and 30");
        }
        if let Some(e) = &self.experiment {
            e.validate(self.nodes.count)?;
        }
        if let Some(r) = &self.routes {
            r.validate()?;
        }
        let [lat_min, lon_min, lat_max, lon_max] = self.nodes.region;
        let lat_ok = (-90.0..=90.0).contains(&lat_min) && (-90.0..=90.0).contains(&lat_max) && lat_min <= lat_max;
        let lon_ok = (-180.0..=180.0).contains(&lon_min) && (-180.0..=180.0).contains(&lon_max) && lon_min <= lon_max;
        if !lat_ok || !lon_ok {
            return bad(
                "nodes.region",
                "must be [lat_min, lon_min, lat_max, lon_max] with min <= max inside -90..90 / -180..180",
            );
        }
        if !finite_nonneg(self.nodes.join_over_s) {
            return bad("nodes.join_over_s", "must be >= 0");
        }
        if !finite_nonneg(self.nodes.leave_grace_s) {
            return bad("nodes.leave_grace_s", "must be >= 0");
        }
        if self.overlay.heartbeat_ms == Some(0) {
            return bad("overlay.heartbeat_ms", "must be > 0");
        }
        if self.overlay.max_children.is_some_and(|m| m < 2) {
            return bad("overlay.max_children", "must be at least 2");
        }
        if let Some(t) = &self.topology {
            if !(1..=20).contains(&t.levels) {
                return bad("topology.levels", "must be between 1 and 20");
            }
            if !finite_nonneg(t.hop_latency_ms) {
                return bad("topology.hop_latency_ms", "must be >= 0");
            }
        }
        for (i, e) in self.events.iter().enumerate() {
            let key = |field: &str| format!("events[{i}].{field}");
            if !finite_nonneg(e.at_s) {
                return Err((key("at_s"), "must be >= 0".into()));
            }
            match e.kind {
                EventKind::Crash | EventKind::Restart | EventKind::Leave => {
                    if e.target.is_none() {
                        return Err((key("target"), format!("is required for {:?}", e.kind).to_lowercase()));
                    }
                    if e.split_lon.is_some() {
                        return Err((key("split_lon"), "only applies to partition".into()));
                    }
                    if let Some(Target::Index(i)) = e.target
                        && i >= self.nodes.count
                    {
                        return Err((
                            key("target"),
                            format!("node index {i} is out of range (nodes.count = {})", self.nodes.count),
                        ));
                    }
                }
                EventKind::Partition => {
                    if !e.split_lon.is_some_and(|l| (-180.0..=180.0).contains(&l)) {
                        return Err((key("split_lon"), "is required for partition (a longitude in -180..180)".into()));
                    }
                    if e.target.is_some() {
                        return Err((key("target"), "does not apply to partition".into()));
                    }
                }
                EventKind::Heal => {
                    if e.target.is_some() || e.split_lon.is_some() {
                        return Err((key("kind"), "heal takes neither target nor split_lon".into()));
                    }
                }
            }
        }
        Ok(())
    }

    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
seed = 7
duration_s = 600
[network]
base_latency_ms = 2.0
km_per_ms = 100.0
jitter_ms = 1.0
loss = 0.01
[nodes]
count = 2000
region = [35.0, -10.0, 60.0, 30.0]
join_over_s = 60
[[events]]
at_s = 200
kind = "crash"
target = "root"
[[events]]
at_s = 250
kind = "restart"
target = 17
[[events]]
at_s = 300
kind = "partition"
split_lon = 10.0
[[events]]
at_s = 360
kind = "heal"
"#;

    #[test]
    fn parses_the_documented_example() {
        let s = Scenario::from_toml(EXAMPLE, "example").unwrap();
        assert_eq!(s.seed, 7);
        assert_eq!(s.nodes.count, 2000);
        assert_eq!(s.events.len(), 4);
        assert_eq!(s.events[0].target, Some(Target::Root));
        assert_eq!(s.events[1].target, Some(Target::Index(17)));
        assert_eq!(s.events[2].split_lon, Some(10.0));
    }

    #[test]
    fn round_trips_through_toml() {
        let s = Scenario::from_toml(EXAMPLE, "example").unwrap();
        let again = Scenario::from_toml(&s.to_toml(), "again").unwrap();
        assert_eq!(s, again);
    }

    #[test]
    fn unknown_key_is_named() {
        let text = EXAMPLE.replace("jitter_ms", "jiter_ms");
        let err = Scenario::from_toml(&text, "x").unwrap_err().to_string();
        assert!(err.contains("jiter_ms"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            ("loss = 0.01", "loss = 1.5", "network.loss"),
            ("target = \"root\"", "target = \"leaders:2\"", "leaders:2"),
            ("target = 17", "target = 5000", "events[1].target"),
            ("split_lon = 10.0", "", "events[2].split_lon"),
            ("count = 2000", "count = 0", "nodes.count"),
        ];
        for (from, to, expected) in cases {
            let err = Scenario::from_toml(&EXAMPLE.replace(from, to), "x").unwrap_err().to_string();
            assert!(err.contains(expected), "{from} -> {to}: {err}");
        }
    }

    #[test]
    fn platform_range_and_machine_prefix_are_checked() {
        let with = |overlay: &str| Scenario::from_toml(&format!("{EXAMPLE}\n[overlay]\n{overlay}\n"), "x");
        let ok = with("platform_range = \"10.0.0.0/8\"\nmachine_prefix = 28").unwrap();
        let config = crate::engine::overlay_config(&ok);
        assert_eq!(config.routes.platform_range, "10.0.0.0/8".parse().unwrap());
        assert_eq!(config.routes.machine_prefix, 28);
        for bad in ["platform_range = \"10.0.0.1/8\"", "platform_range = \"10.16.0.0/14\"", "machine_prefix = 31"] {
            let err = with(bad).unwrap_err().to_string();
            assert!(err.contains("overlay."), "{bad}: {err}");
        }
        assert!(with("platform_range = \"ten\"").is_err());
    }

    #[test]
    fn targets_parse_and_print() {
        for t in ["root", "all", "coordinators:3", "random:5", "12"] {
            assert_eq!(t.parse::<Target>().unwrap().to_string(), t);
        }
        assert!("random:x".parse::<Target>().is_err());
        assert!("leader".parse::<Target>().is_err());
        // A misspelt kind lists every form, as a bare word does.
        let err = "coords:3".parse::<Target>().unwrap_err();
        assert!(err.contains("\"coords:3\"") && err.contains("\"root\"") && err.contains("an index"), "{err}");
    }

    #[test]
    fn an_unreadable_file_names_its_cause_once() {
        let err = Scenario::from_file(std::path::Path::new("/nonexistent/scenario.toml")).unwrap_err();
        let shown = format!("{:#}", anyhow::Error::new(err));
        assert_eq!(shown.matches("No such file").count(), 1, "{shown}");
        assert!(shown.starts_with("cannot read scenario /nonexistent/scenario.toml: "), "{shown}");
    }
}
