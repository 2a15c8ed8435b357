//! Answers one request: our names from the [`ServiceLookup`], everything else through the forwarding catalog.

use super::counters::DnsCounters;
use super::lookup::{LookupError, ServiceLookup};
use super::names::{NameClass, classify};
use canopy_overlay::routes::{DnsTarget, ServiceDomain};
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::{DNSClass, RData, Record, RecordType, rdata::A};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{Catalog, MessageResponseBuilder};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, warn};

/// The request handler shared by the UDP and TCP paths (cheap to clone).
#[derive(Clone)]
pub struct DnsHandler {
    domain: ServiceDomain,
    ttl: u32,
    lookup_timeout: Duration,
    lookup: Arc<dyn ServiceLookup>,
    /// `None` when no upstream is configured: other names get SERVFAIL.
    forwarder: Option<Arc<Catalog>>,
    counters: Arc<DnsCounters>,
}

/// What we answer for one of our names.
enum Outcome {
    Address(Ipv4Addr),
    NoData,
    NxDomain,
    ServFail,
}

impl DnsHandler {
    pub fn new(
        domain: ServiceDomain,
        ttl: Duration,
        lookup_timeout: Duration,
        lookup: Arc<dyn ServiceLookup>,
        forwarder: Option<Catalog>,
        counters: Arc<DnsCounters>,
    ) -> Self {
        let ttl = u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX);
        Self { domain, ttl, lookup_timeout, lookup, forwarder: forwarder.map(Arc::new), counters }
    }

    async fn answer_ours(&self, target: &DnsTarget, record_type: RecordType) -> Outcome {
        let resolved = match tokio::time::timeout(self.lookup_timeout, self.lookup.resolve(target)).await {
            Ok(resolved) => resolved,
            Err(_) => Err(LookupError::Timeout),
        };
        match resolved {
            Ok(Some(address)) if record_type == RecordType::A => Outcome::Address(address),
            // The name exists but has only an IPv4 address: NOERROR with no records for AAAA and the rest.
            Ok(Some(_)) => Outcome::NoData,
            Ok(None) => Outcome::NxDomain,
            Err(error) => {
                debug!(%error, ?target, "service lookup failed");
                Outcome::ServFail
            }
        }
    }

    fn count(&self, outcome: &Outcome) {
        let counters = &self.counters;
        DnsCounters::bump(match outcome {
            Outcome::Address(_) | Outcome::NoData => &counters.answered,
            Outcome::NxDomain => &counters.nxdomain,
            Outcome::ServFail => &counters.lookup_failures,
        });
    }
}

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, handle: R) -> ResponseInfo {
        DnsCounters::bump(&self.counters.queries);
        if request.metadata.message_type != MessageType::Query || request.metadata.op_code != OpCode::Query {
            DnsCounters::bump(&self.counters.rejected);
            return respond(request, handle, ResponseCode::NotImp, None).await;
        }
        let Ok(info) = request.request_info() else {
            // Zero or several questions: nobody sends that for real.
            DnsCounters::bump(&self.counters.rejected);
            return respond(request, handle, ResponseCode::FormErr, None).await;
        };
        let query = info.query;
        let class = classify(&query.name().to_string(), &self.domain);
        if class != NameClass::Foreign && query.query_class() != DNSClass::IN {
            DnsCounters::bump(&self.counters.rejected);
            return respond(request, handle, ResponseCode::Refused, None).await;
        }
        let outcome = match class {
            NameClass::Foreign => return self.forward::<R, T>(request, handle).await,
            NameClass::Apex => Outcome::NoData,
            NameClass::Ours(Err(error)) => {
                debug!(name = %query.name(), %error, "malformed service name");
                DnsCounters::bump(&self.counters.malformed_names);
                Outcome::NxDomain
            }
            NameClass::Ours(Ok(target)) => self.answer_ours(&target, query.query_type()).await,
        };
        self.count(&outcome);
        match outcome {
            Outcome::Address(address) => {
                let record = Record::from_rdata(query.name().into(), self.ttl, RData::A(A(address)));
                respond(request, handle, ResponseCode::NoError, Some(&record)).await
            }
            Outcome::NoData => respond(request, handle, ResponseCode::NoError, None).await,
            Outcome::NxDomain => respond(request, handle, ResponseCode::NXDomain, None).await,
            Outcome::ServFail => respond(request, handle, ResponseCode::ServFail, None).await,
        }
    }
}

impl DnsHandler {
    async fn forward<R: ResponseHandler, T: Time>(&self, request: &Request, handle: R) -> ResponseInfo {
        DnsCounters::bump(&self.counters.forwarded);
        let info = match &self.forwarder {
            Some(catalog) => catalog.handle_request::<R, T>(request, handle).await,
            None => respond(request, handle, ResponseCode::ServFail, None).await,
        };
        if info.response_code == ResponseCode::ServFail {
            DnsCounters::bump(&self.counters.upstream_failures);
        }
        info
    }
}

/// Sends a response to `request` with `code` and at most one answer; we are authoritative for our names and
/// offer recursion (forwarding) for the rest.
async fn respond<R: ResponseHandler>(
    request: &Request,
    mut handle: R,
    code: ResponseCode,
    answer: Option<&Record>,
) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = code;
    // Definite answers (an address, no data, no such name) about our names are authoritative; errors are not.
    metadata.authoritative = matches!(code, ResponseCode::NoError | ResponseCode::NXDomain);
    metadata.recursion_available = true;
    let edns = request.edns.as_ref().map(|requested| {
        let mut edns = Edns::new();
        edns.set_max_payload(requested.max_payload().max(512));
        edns
    });
    let mut builder = MessageResponseBuilder::from_message_request(request);
    if let Some(edns) = &edns {
        builder.edns(edns);
    }
    let none = || std::iter::empty::<&Record>();
    let response = builder.build(metadata, answer, none(), none(), none());
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(error) => {
            warn!(%error, client = %request.src(), "cannot send a DNS response");
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() })
        }
    }
}
