//! Prometheus metrics of the control plane, served on `--metrics ADDR` at `/metrics`.

use anyhow::Context;
use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// Counters the swarm task updates and the API reports.
#[derive(Debug, Default)]
pub struct Metrics {
    pub messages_sent: Counter,
    pub messages_received: Counter,
    /// Tree messages not delivered or not accepted, by reason.
    pub messages_dropped: Family<ReasonLabel, Counter>,
    pub admissions: Family<ResultLabel, Counter>,
    pub connected_peers: Gauge,
    pub term: Gauge,
    /// 0 detached, 1 leaf, 2 coordinator, 3 root.
    pub role: Gauge,
    /// The overlay core's counters as the swarm task last saw them, read at each scrape.
    protocol: Mutex<ProtocolCounters>,
}

#[derive(Debug, Default, Clone)]
struct ProtocolCounters {
    tree: canopy_overlay::Counters,
    routes: canopy_overlay::routing::RoutingCounters,
}

impl Metrics {
    pub fn dropped(&self, reason: &'static str) {
        self.messages_dropped.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn admission(&self, result: &'static str) {
        self.admissions.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn dropped_total(&self) -> u64 {
        ["malformed", "not_member", "spoofed", "unreachable", "queue_full", "send_failed"]
            .iter()
            .map(|reason| self.messages_dropped.get_or_create(&ReasonLabel { reason }).get())
            .sum()
    }

    /// Records the overlay core's counters (cheap: the swarm task calls it after every batch of outputs).
    pub fn set_protocol(&self, tree: &canopy_overlay::Counters, routes: &canopy_overlay::routing::RoutingCounters) {
        if let Ok(mut protocol) = self.protocol.lock() {
            protocol.tree.clone_from(tree);
            protocol.routes.clone_from(routes);
        }
    }

    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut registry = Registry::with_prefix("canopy");
        registry.register("overlay_messages_sent", "Tree messages sent", self.messages_sent.clone());
        registry.register("overlay_messages_received", "Tree messages accepted", self.messages_received.clone());
        registry.register("overlay_messages_dropped", "Tree messages dropped", self.messages_dropped.clone());
        registry.register("admissions", "Admission handshakes by result", self.admissions.clone());
        registry.register("connected_peers", "Peers with an open connection", self.connected_peers.clone());
        registry.register("overlay_term", "Current overlay term", self.term.clone());
        registry.register("overlay_role", "0 detached, 1 leaf, 2 coordinator, 3 root", self.role.clone());
        registry.register_collector(Box::new(ProtocolCollector(Arc::clone(self))));
        registry
    }
}

/// Exports every field of the overlay's counters as `canopy_tree_<field>_total` and of routing's as
/// `canopy_routes_<field>_total`, by field name, so that a counter added to either is exported without a change.
#[derive(Debug)]
struct ProtocolCollector(Arc<Metrics>);

impl Collector for ProtocolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.0.protocol.lock().map(|p| p.clone()).unwrap_or_default();
        let groups = [
            ("tree", "Overlay core counter", serde_json::to_value(&snapshot.tree)),
            ("routes", "Routing counter", serde_json::to_value(&snapshot.routes)),
        ];
        for (group, help, fields) in groups {
            let Ok(serde_json::Value::Object(fields)) = fields else { continue };
            for (field, value) in fields {
                let Some(value) = value.as_u64() else { continue };
                let counter = ConstCounter::new(value);
                let name = format!("{group}_{field}");
                let metric =
                    encoder.encode_descriptor(&name, &format!("{help}: {field}"), None, counter.metric_type())?;
                counter.encode(metric)?;
            }
        }
        Ok(())
    }
}

/// Serves `/metrics` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let registry = Arc::new(metrics.registry());
    let router = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut text = String::new();
                match prometheus_client::encoding::text::encode(&mut text, &registry) {
                    Ok(()) => {
                        ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0")], text).into_response()
                    }
                    Err(_) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "encoding failed").into_response(),
                }
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, router).await {
            tracing::warn!("metrics server stopped: {err}");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_counters() {
        let metrics = Arc::new(Metrics::default());
        metrics.messages_sent.inc();
        metrics.dropped("malformed");
        metrics.dropped("malformed");
        metrics.admission("refused");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry()).unwrap();
        assert!(text.contains("canopy_overlay_messages_sent_total 1"), "{text}");
        assert!(text.contains("canopy_overlay_messages_dropped_total{reason=\"malformed\"} 2"), "{text}");
        assert!(text.contains("canopy_admissions_total{result=\"refused\"} 1"), "{text}");
        assert_eq!(metrics.dropped_total(), 2);
    }

    #[test]
    fn exports_the_overlay_s_own_counters() {
        let metrics = Arc::new(Metrics::default());
        let tree = canopy_overlay::Counters { takeovers: 2, duplicates: 5, ..Default::default() };
        let routes = canopy_overlay::routing::RoutingCounters { renumbered: 3, ..Default::default() };
        metrics.set_protocol(&tree, &routes);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry()).unwrap();
        assert!(text.contains("canopy_tree_takeovers_total 2"), "{text}");
        assert!(text.contains("canopy_tree_duplicates_total 5"), "{text}");
        assert!(text.contains("canopy_routes_renumbered_total 3"), "{text}");
        assert!(text.contains("canopy_routes_blocks_handed_over_total 0"), "{text}");
        assert!(text.contains("# TYPE canopy_tree_splits counter"), "{text}");
    }
}
