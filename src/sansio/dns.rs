//! The gateway resolver's request handling, pure: bytes in, a verdict out; time passed in.
//!
//! The shell (`gateway::dns`) receives a query from a tunnel client, asks its per-client gate
//! whether that client may ask now, hands the bytes to [`check_query`], forwards what comes out as
//! [`Verdict::Forward`] to an upstream, checks the upstream's answer with [`check_reply`] and
//! sends the client either that or [`servfail`]. Every function here takes attacker-controlled
//! bytes: each returns a value, never panics, and allocates only in proportion to a query it
//! accepted (bounded by [`MAX_MESSAGE`]).
//!
//! The wire format is hickory-proto's: nothing here parses or builds DNS by hand.

use hickory_proto::op::{Header, Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

/// Largest query or reply handled, in bytes. A real query is well under 512; EDNS replies are
/// capped at 4096 by every common resolver. Bigger input is dropped unread.
pub const MAX_MESSAGE: usize = 4096;

/// How a query reached the resolver (replies over UDP are bounded by what the client advertised;
/// the upstream sees the same query and sizes its reply accordingly, so nothing is cut here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What to do with one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Ask an upstream: send `wire` (the client's query under `upstream_id`), check the answer
    /// with [`check_reply`].
    Forward(Forward),
    /// Answer at once with these bytes (FORMERR, NOTIMP or REFUSED for a query we will not
    /// forward), without asking anyone.
    Reply(Vec<u8>),
    /// Say nothing: too short to carry a header, too long, or not a query at all (a reply sent to
    /// a resolver is how reflection loops start).
    Drop(DropReason),
}

/// Why a query got no answer at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Shorter than a header, or longer than [`MAX_MESSAGE`].
    Size,
    /// A DNS response, not a query.
    NotAQuery,
}

/// A query accepted for forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The client's message id, put back on the reply.
    pub client_id: u16,
    /// The id used towards the upstream (chosen by the caller, random).
    pub upstream_id: u16,
    /// The one question, to match the upstream's reply against.
    pub question: Query,
    /// The header of the client's query (for a SERVFAIL built without the upstream).
    metadata: Metadata,
    /// The query to send upstream.
    pub wire: Vec<u8>,
}

/// Decides what to do with `bytes`, a query from an admitted client. `upstream_id` is the message
/// id to use towards the upstream (random, from the caller).
pub fn check_query(bytes: &[u8], upstream_id: u16) -> Verdict {
    if bytes.len() > MAX_MESSAGE {
        return Verdict::Drop(DropReason::Size);
    }
    let Ok(header) = Header::read(&mut BinDecoder::new(bytes)) else {
        return Verdict::Drop(DropReason::Size);
    };
    let meta = header.metadata;
    if meta.message_type != MessageType::Query {
        return Verdict::Drop(DropReason::NotAQuery);
    }
    let refuse = |code: ResponseCode, question: Option<&Query>| {
        let mut m = Message::new(meta.id, MessageType::Response, meta.op_code);
        m.metadata = Metadata::response_from_request(&meta);
        m.metadata.response_code = code;
        m.metadata.recursion_available = true;
        if let Some(q) = question {
            m.add_query(q.clone());
        }
        encode_or_bare(&m, meta.id, code)
    };
    if meta.op_code != OpCode::Query {
        return Verdict::Reply(refuse(ResponseCode::NotImp, None));
    }
    // Compression loops, pointers past the end, bad labels: hickory's decoder refuses them all.
    let Ok(msg) = Message::from_vec(bytes) else {
        return Verdict::Reply(refuse(ResponseCode::FormErr, None));
    };
    if msg.queries.len() != 1 || !msg.answers.is_empty() || !msg.authorities.is_empty() || meta.truncation {
        return Verdict::Reply(refuse(ResponseCode::FormErr, None));
    }
    let question = msg.queries[0].clone();
    // Zone transfers and other classes are no business of a client resolver.
    let refused_type = matches!(question.query_type(), RecordType::AXFR | RecordType::IXFR | RecordType::ANY);
    if refused_type || question.query_class() != DNSClass::IN {
        return Verdict::Reply(refuse(ResponseCode::Refused, Some(&question)));
    }
    let mut upstream = msg;
    upstream.metadata.id = upstream_id;
    // TSIG/SIG(0) from a client mean nothing to our upstream.
    upstream.signature = None;
    match upstream.to_vec() {
        Ok(wire) if wire.len() <= MAX_MESSAGE => {
            Verdict::Forward(Forward { client_id: meta.id, upstream_id, question, metadata: meta, wire })
        }
        _ => Verdict::Reply(refuse(ResponseCode::FormErr, Some(&question))),
    }
}

/// Why an upstream's answer was not passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply too long or unparseable")]
    Malformed,
    #[error("reply to another query (id or question differ)")]
    Mismatch,
}

/// Checks an upstream's answer to `fwd` and returns it for the client (the client's id back in
/// place). A reply for another id or question (a late answer, a spoofing attempt) is an error;
/// the caller keeps waiting for the right one or gives up with [`servfail`].
pub fn check_reply(fwd: &Forward, bytes: &[u8]) -> Result<Vec<u8>, ReplyError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(ReplyError::Malformed);
    }
    let mut msg = Message::from_vec(bytes).map_err(|_| ReplyError::Malformed)?;
    if msg.metadata.message_type != MessageType::Response || msg.metadata.id != fwd.upstream_id {
        return Err(ReplyError::Mismatch);
    }
    let same_question = msg.queries.len() == 1 && {
        let q = &msg.queries[0];
        q.query_type() == fwd.question.query_type()
            && q.query_class() == fwd.question.query_class()
            // hickory's `Name` equality ignores case, as DNS does (and 0x20 randomisation
            // by an upstream stays the same question).
            && q.name() == fwd.question.name()
    };
    if !same_question {
        return Err(ReplyError::Mismatch);
    }
    msg.metadata.id = fwd.client_id;
    msg.signature = None;
    msg.to_vec().map_err(|_| ReplyError::Malformed)
}

/// SERVFAIL for `fwd`: no upstream answered in time (or at all).
pub fn servfail(fwd: &Forward) -> Vec<u8> {
    let mut m = Message::new(fwd.client_id, MessageType::Response, OpCode::Query);
    m.metadata = Metadata::response_from_request(&fwd.metadata);
    m.metadata.response_code = ResponseCode::ServFail;
    m.metadata.recursion_available = true;
    m.add_query(fwd.question.clone());
    encode_or_bare(&m, fwd.client_id, ResponseCode::ServFail)
}

/// Encodes `m`; if that fails (a question hickory parsed but cannot write back), the bare header
/// with `code` and no question, which always encodes.
fn encode_or_bare(m: &Message, id: u16, code: ResponseCode) -> Vec<u8> {
    m.to_vec().unwrap_or_else(|_| {
        let mut bare = Message::new(id, MessageType::Response, m.metadata.op_code);
        bare.metadata.response_code = code;
        bare.to_vec().unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::Name;
    use std::str::FromStr;

    fn query(name: &str, rtype: RecordType, id: u16) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name).unwrap(), rtype));
        m.to_vec().unwrap()
    }

    fn rcode(bytes: &[u8]) -> ResponseCode {
        Message::from_vec(bytes).unwrap().metadata.response_code
    }

    #[test]
    fn a_plain_query_is_forwarded_under_the_upstream_id_and_answered_under_the_clients() {
        let Verdict::Forward(f) = check_query(&query("www.example.test.", RecordType::A, 7), 999) else {
            panic!("not forwarded")
        };
        assert_eq!(f.client_id, 7);
        let up = Message::from_vec(&f.wire).unwrap();
        assert_eq!(up.metadata.id, 999);
        assert!(up.metadata.recursion_desired);

        let mut reply = up.clone();
        reply.metadata.message_type = MessageType::Response;
        // 0x20 case randomisation by the upstream is still the same question.
        reply.queries[0].set_name(Name::from_str("WWW.Example.TEST.").unwrap());
        let back = check_reply(&f, &reply.to_vec().unwrap()).unwrap();
        assert_eq!(Message::from_vec(&back).unwrap().metadata.id, 7);

        let sf = servfail(&f);
        let m = Message::from_vec(&sf).unwrap();
        assert_eq!((m.metadata.id, m.metadata.response_code), (7, ResponseCode::ServFail));
        assert_eq!(m.queries, vec![f.question.clone()]);
    }

    #[test]
    fn replies_to_other_queries_are_refused() {
        let Verdict::Forward(f) = check_query(&query("a.test.", RecordType::A, 1), 2) else { panic!() };
        let reply = |id: u16, name: &str, t: RecordType| {
            let mut m = Message::new(id, MessageType::Response, OpCode::Query);
            m.add_query(Query::query(Name::from_str(name).unwrap(), t));
            m.to_vec().unwrap()
        };
        assert_eq!(check_reply(&f, &reply(3, "a.test.", RecordType::A)), Err(ReplyError::Mismatch));
        assert_eq!(check_reply(&f, &reply(2, "b.test.", RecordType::A)), Err(ReplyError::Mismatch));
        assert_eq!(check_reply(&f, &reply(2, "a.test.", RecordType::AAAA)), Err(ReplyError::Mismatch));
        assert!(check_reply(&f, &reply(2, "a.test.", RecordType::A)).is_ok());
        assert_eq!(check_reply(&f, &[0; 5]), Err(ReplyError::Malformed));
        // A query echoed back is not an answer.
        assert_eq!(check_reply(&f, &f.wire), Err(ReplyError::Mismatch));
    }

    #[test]
    fn hostile_queries_get_errors_not_panics() {
        // Too short for a header, oversized: silence.
        assert_eq!(check_query(&[], 1), Verdict::Drop(DropReason::Size));
        assert_eq!(check_query(&[0; 11], 1), Verdict::Drop(DropReason::Size));
        assert_eq!(check_query(&vec![0; MAX_MESSAGE + 1], 1), Verdict::Drop(DropReason::Size));
        // A response sent to the resolver: silence (no reflection).
        let mut resp = query("a.test.", RecordType::A, 5);
        resp[2] |= 0x80;
        assert_eq!(check_query(&resp, 1), Verdict::Drop(DropReason::NotAQuery));
        // Header claiming one question, then a compression pointer to itself.
        let mut looped = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert!(matches!(check_query(&looped, 1), Verdict::Reply(r) if rcode(&r) == ResponseCode::FormErr));
        // Truncated question.
        let q = query("www.example.test.", RecordType::A, 9);
        assert!(matches!(check_query(&q[..q.len() - 3], 1), Verdict::Reply(r) if rcode(&r) == ResponseCode::FormErr));
        // Two questions.
        let mut two = Message::new(3, MessageType::Query, OpCode::Query);
        two.add_query(Query::query(Name::from_str("a.").unwrap(), RecordType::A));
        two.add_query(Query::query(Name::from_str("b.").unwrap(), RecordType::A));
        assert!(
            matches!(check_query(&two.to_vec().unwrap(), 1), Verdict::Reply(r) if rcode(&r) == ResponseCode::FormErr)
        );
        // Zone transfer, other opcodes.
        assert!(
            matches!(check_query(&query("example.test.", RecordType::AXFR, 4), 1), Verdict::Reply(r) if rcode(&r) == ResponseCode::Refused)
        );
        let mut notify = q.clone();
        notify[2] = (notify[2] & 0x87) | (4 << 3);
        assert!(matches!(check_query(&notify, 1), Verdict::Reply(r) if rcode(&r) == ResponseCode::NotImp));
    }

    proptest::proptest! {
        /// Any bytes, and valid queries with bytes flipped or cut: a verdict, never a panic; a
        /// local reply is always a response to the query's own id.
        #[test]
        fn any_input_gets_a_verdict(
            raw in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
            flips in proptest::collection::vec((0usize..64, proptest::num::u8::ANY), 0..6),
            cut in 0usize..64,
        ) {
            let mut mutated = query("www.example.test.", RecordType::A, 0x0102);
            for (at, b) in flips {
                if let Some(x) = mutated.get_mut(at) {
                    *x = b;
                }
            }
            mutated.truncate(mutated.len().saturating_sub(cut).max(1));
            for input in [&raw, &mutated] {
                match check_query(input, 9) {
                    Verdict::Reply(r) => {
                        proptest::prop_assert!(r.len() >= 12 && r[2] & 0x80 != 0);
                        proptest::prop_assert_eq!(&r[..2], &input[..2]);
                    }
                    Verdict::Forward(f) => {
                        // The query itself is never taken for its answer; random bytes rarely are.
                        proptest::prop_assert!(check_reply(&f, &f.wire).is_err());
                        let _ = check_reply(&f, &raw);
                        proptest::prop_assert_eq!(&servfail(&f)[..2], &input[..2]);
                    }
                    Verdict::Drop(_) => {}
                }
            }
        }
    }
}
