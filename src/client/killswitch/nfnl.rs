//! nf_tables netlink messages, pure: the batches the kill-switch sends and the replies and events
//! it reads. No sockets here ([`super::kernel`] sends and receives); every decoder takes bytes
//! from the kernel and returns an error or skips, never panics.
//!
//! Why by hand: the nf_tables crates on crates.io either wrap the C libnftnl (`nftnl`), or open a
//! fresh socket per batch (`rustables`), which cannot work here: a table with the `owner` flag
//! belongs to the one netlink socket that created it, and only that socket may change it. The
//! messages the kill-switch needs are few (a table, two base chains, rules made of five expression
//! kinds), and the uapi header (`linux/netfilter/nf_tables.h`) fixes their layout.

use super::rules::{Base, Expr, MetaKey, Rule, Verdict};

pub const NETLINK_NETFILTER: isize = 12;
/// The multicast group of nf_tables change events.
pub const NFNLGRP_NFTABLES: u32 = 7;

/// The table belongs to the netlink socket that set this flag; no other socket may change it.
pub const TABLE_F_OWNER: u32 = 0x2;
/// With [`TABLE_F_OWNER`]: the table outlives its owner's socket, orphaned, until a new owner
/// adopts it (Linux 6.9 and later).
pub const TABLE_F_PERSIST: u32 = 0x4;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFPROTO_INET: u8 = 1;
const AF_UNSPEC: u8 = 0;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

/// `enum nf_tables_msg_types`.
pub mod msg {
    pub const NEWTABLE: u8 = 0;
    pub const GETTABLE: u8 = 1;
    pub const DELTABLE: u8 = 2;
    pub const NEWCHAIN: u8 = 3;
    pub const GETCHAIN: u8 = 4;
    pub const NEWRULE: u8 = 6;
    pub const DELRULE: u8 = 8;
    pub const NEWGEN: u8 = 15;
}

// Attribute numbers, from the uapi header.
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_TABLE_OWNER: u16 = 7;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
/// `NFTNL_UDATA_RULE_COMMENT`: how nft stores a rule's comment in its user data.
const UDATA_RULE_COMMENT: u8 = 0;

const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;

/// Netfilter hook numbers of the two base chains.
pub const HOOK_INPUT: u32 = 1;
pub const HOOK_OUTPUT: u32 = 3;

/// The hook of a base chain named `input` or `output`.
pub fn hook_of(chain: &str) -> u32 {
    if chain == "input" { HOOK_INPUT } else { HOOK_OUTPUT }
}

fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends netlink attributes to a buffer.
struct Attrs<'a>(&'a mut Vec<u8>);

impl Attrs<'_> {
    fn bytes(&mut self, ty: u16, data: &[u8]) {
        let len = 4 + data.len();
        // Attribute payloads here are small (names, addresses, a few nested expressions).
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(pad4(self.0.len()), 0);
    }
    fn str(&mut self, ty: u16, s: &str) {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.bytes(ty, &v);
    }
    /// nf_tables' integers are big-endian.
    fn be32(&mut self, ty: u16, v: u32) {
        self.bytes(ty, &v.to_be_bytes());
    }
    fn nest(&mut self, ty: u16, f: impl FnOnce(&mut Attrs)) {
        let start = self.0.len();
        self.0.extend_from_slice(&[0, 0]);
        self.0.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        f(&mut Attrs(self.0));
        let len = (self.0.len() - start) as u16;
        self.0[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

/// Appends one netlink message with an nfgenmsg header; `f` writes its attributes.
fn put_msg(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8, res_id: u16, f: impl FnOnce(&mut Attrs)) {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&[family, 0]);
    buf.extend_from_slice(&res_id.to_be_bytes());
    f(&mut Attrs(buf));
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

fn nft_type(m: u8) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | u16::from(m)
}

/// One transaction: everything between BATCH_BEGIN and BATCH_END is applied by the kernel as a
/// whole or not at all. Every message asks for an acknowledgement, so the reply says which one
/// failed.
pub struct Batch {
    buf: Vec<u8>,
    next_seq: u32,
    /// Sequence number and a description of each message, for error messages.
    msgs: Vec<(u32, String)>,
}

impl Batch {
    /// A batch whose messages are numbered from `seq`.
    pub fn new(seq: u32) -> Self {
        let mut buf = Vec::with_capacity(8192);
        put_msg(&mut buf, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, AF_UNSPEC, NFNL_SUBSYS_NFTABLES, |_| {});
        Self { buf, next_seq: seq.wrapping_add(1), msgs: Vec::new() }
    }

    fn msg(&mut self, m: u8, flags: u16, what: String, f: impl FnOnce(&mut Attrs)) {
        let seq = self.next_seq;
        self.next_seq = seq.wrapping_add(1);
        put_msg(&mut self.buf, nft_type(m), NLM_F_REQUEST | NLM_F_ACK | flags, seq, NFPROTO_INET, 0, f);
        self.msgs.push((seq, what));
    }

    /// Creates the `inet` table `name` with `flags`, or updates the flags of the existing one
    /// (which is how an orphaned table is adopted).
    pub fn new_table(&mut self, name: &str, flags: u32) {
        self.msg(msg::NEWTABLE, NLM_F_CREATE, format!("table inet {name}"), |a| {
            a.str(NFTA_TABLE_NAME, name);
            a.be32(NFTA_TABLE_FLAGS, flags);
        });
    }

    pub fn del_table(&mut self, name: &str) {
        self.msg(msg::DELTABLE, 0, format!("delete table inet {name}"), |a| a.str(NFTA_TABLE_NAME, name));
    }

    /// Declares the base filter chain `name` on its hook at priority 0 with policy drop (a no-op
    /// but for the policy when it exists with that hook and priority).
    pub fn new_chain(&mut self, table: &str, name: &str) {
        self.msg(msg::NEWCHAIN, NLM_F_CREATE, format!("chain {name}"), |a| {
            a.str(NFTA_CHAIN_TABLE, table);
            a.str(NFTA_CHAIN_NAME, name);
            a.nest(NFTA_CHAIN_HOOK, |h| {
                h.be32(NFTA_HOOK_HOOKNUM, hook_of(name));
                h.be32(NFTA_HOOK_PRIORITY, 0);
            });
            a.be32(NFTA_CHAIN_POLICY, NF_DROP);
            a.str(NFTA_CHAIN_TYPE, "filter");
        });
    }

    /// Deletes every rule of the table (its chains stay, with their policies).
    pub fn flush_table(&mut self, table: &str) {
        self.msg(msg::DELRULE, 0, format!("flush table inet {table}"), |a| a.str(NFTA_RULE_TABLE, table));
    }

    /// Appends `rule` to `chain`.
    pub fn new_rule(&mut self, table: &str, chain: &str, rule: &Rule) {
        self.msg(msg::NEWRULE, NLM_F_CREATE | NLM_F_APPEND, format!("rule {:?} ({})", rule.text, rule.why), |a| {
            a.str(NFTA_RULE_TABLE, table);
            a.str(NFTA_RULE_CHAIN, chain);
            a.nest(NFTA_RULE_EXPRESSIONS, |list| {
                for e in &rule.exprs {
                    list.nest(NFTA_LIST_ELEM, |el| put_expr(el, e));
                }
            });
            let mut udata = vec![UDATA_RULE_COMMENT, (rule.why.len() + 1) as u8];
            udata.extend_from_slice(rule.why.as_bytes());
            udata.push(0);
            a.bytes(NFTA_RULE_USERDATA, &udata);
        });
    }

    /// Closes the batch: the bytes to send and what each acknowledged message was.
    pub fn finish(mut self) -> (Vec<u8>, Vec<(u32, String)>) {
        put_msg(
            &mut self.buf,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            self.next_seq,
            AF_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
            |_| {},
        );
        (self.buf, self.msgs)
    }
}

fn put_expr(a: &mut Attrs, e: &Expr) {
    let data = |a: &mut Attrs, ty: u16, bytes: &[u8]| a.nest(ty, |d| d.bytes(NFTA_DATA_VALUE, bytes));
    match e {
        Expr::Meta(key) => {
            a.str(NFTA_EXPR_NAME, "meta");
            let key = match key {
                MetaKey::IifName => 6,
                MetaKey::OifName => 7,
                MetaKey::NfProto => 15,
                MetaKey::L4Proto => 16,
            };
            a.nest(NFTA_EXPR_DATA, |d| {
                d.be32(1, NFT_REG_1); // NFTA_META_DREG
                d.be32(2, key); // NFTA_META_KEY
            });
        }
        Expr::Payload { base, offset, len } => {
            a.str(NFTA_EXPR_NAME, "payload");
            let base = match base {
                Base::Network => 1,
                Base::Transport => 2,
            };
            a.nest(NFTA_EXPR_DATA, |d| {
                d.be32(1, NFT_REG_1); // NFTA_PAYLOAD_DREG
                d.be32(2, base);
                d.be32(3, *offset);
                d.be32(4, *len);
            });
        }
        Expr::Mask(mask) => {
            a.str(NFTA_EXPR_NAME, "bitwise");
            a.nest(NFTA_EXPR_DATA, |d| {
                d.be32(1, NFT_REG_1); // NFTA_BITWISE_SREG
                d.be32(2, NFT_REG_1); // NFTA_BITWISE_DREG
                d.be32(3, mask.len() as u32);
                data(d, 4, mask); // NFTA_BITWISE_MASK
                data(d, 5, &vec![0; mask.len()]); // NFTA_BITWISE_XOR
            });
        }
        Expr::Cmp { eq, data: value } => {
            a.str(NFTA_EXPR_NAME, "cmp");
            a.nest(NFTA_EXPR_DATA, |d| {
                d.be32(1, NFT_REG_1); // NFTA_CMP_SREG
                d.be32(2, if *eq { 0 } else { 1 }); // NFT_CMP_EQ / NFT_CMP_NEQ
                data(d, 3, value);
            });
        }
        Expr::Verdict(v) => {
            a.str(NFTA_EXPR_NAME, "immediate");
            let code = match v {
                Verdict::Accept => NF_ACCEPT,
                Verdict::Drop => NF_DROP,
            };
            a.nest(NFTA_EXPR_DATA, |d| {
                d.be32(1, NFT_REG_VERDICT); // NFTA_IMMEDIATE_DREG
                d.nest(2, |imm| imm.nest(NFTA_DATA_VERDICT, |v| v.be32(NFTA_VERDICT_CODE, code)));
            });
        }
    }
}

/// A request for one table (`GETTABLE`): the reply is the table or ENOENT.
pub fn get_table(seq: u32, name: &str) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64);
    put_msg(&mut buf, nft_type(msg::GETTABLE), NLM_F_REQUEST, seq, NFPROTO_INET, 0, |a| a.str(NFTA_TABLE_NAME, name));
    buf
}

/// A dump of every `inet` chain (filtered by table on our side).
pub fn dump_chains(seq: u32) -> Vec<u8> {
    let mut buf = Vec::with_capacity(32);
    put_msg(&mut buf, nft_type(msg::GETCHAIN), NLM_F_REQUEST | NLM_F_DUMP, seq, NFPROTO_INET, 0, |_| {});
    buf
}

/// One message read from the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<'a> {
    /// An acknowledgement (`errno` 0) or an error for the request numbered `seq`.
    Ack { seq: u32, errno: i32 },
    /// The end of a dump.
    Done { seq: u32 },
    /// An nf_tables message: a reply to a GET, or an event.
    Nft(NftMsg<'a>),
    /// Anything else (ignored).
    Other,
}

/// An nf_tables message: its type (`msg::*`), family, the sender's netlink port (for an event,
/// the socket that made the change), and its attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftMsg<'a> {
    pub kind: u8,
    pub family: u8,
    pub seq: u32,
    pub portid: u32,
    attrs: &'a [u8],
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Splits a datagram read from a netlink socket into its messages. Stops at the first malformed
/// header (the rest cannot be framed).
pub fn messages(mut buf: &[u8]) -> impl Iterator<Item = Reply<'_>> {
    std::iter::from_fn(move || {
        let len = u32_at(buf, 0)? as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return None;
        }
        let this = &buf[..len];
        buf = buf.get(pad4(len)..).unwrap_or(&[]);
        let ty = u16_at(this, 4)?;
        let seq = u32_at(this, 8)?;
        let portid = u32_at(this, 12)?;
        let body = &this[NLMSG_HDRLEN..];
        Some(match ty {
            NLMSG_ERROR => match body.get(..4) {
                // nlmsgerr.error is a negative errno, or 0 for an acknowledgement.
                Some(e) => Reply::Ack { seq, errno: -i32::from_ne_bytes(e.try_into().unwrap_or([0; 4])) },
                None => Reply::Other,
            },
            NLMSG_DONE => Reply::Done { seq },
            t if t >> 8 == NFNL_SUBSYS_NFTABLES && body.len() >= NFGENMSG_LEN => Reply::Nft(NftMsg {
                kind: (t & 0xff) as u8,
                family: body[0],
                seq,
                portid,
                attrs: &body[NFGENMSG_LEN..],
            }),
            _ => Reply::Other,
        })
    })
}

/// Iterates over netlink attributes: (type without flags, payload). Stops at a malformed one.
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16_at(b, 0)?);
        let ty = u16_at(b, 2)? & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = b.get(pad4(len)..).unwrap_or(&[]);
        Some((ty, payload))
    })
}

fn attr(b: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(b).find(|(t, _)| *t == ty).map(|(_, p)| p)
}

fn attr_str(b: &[u8], ty: u16) -> Option<&str> {
    let p = attr(b, ty)?;
    let p = p.split(|c| *c == 0).next().unwrap_or(p);
    std::str::from_utf8(p).ok()
}

fn attr_be32(b: &[u8], ty: u16) -> Option<u32> {
    Some(u32::from_be_bytes(attr(b, ty)?.get(..4)?.try_into().ok()?))
}

/// What the kernel says about a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableInfo {
    pub flags: u32,
    /// The owning socket's netlink port, while it has an owner.
    pub owner: Option<u32>,
}

/// A table out of a NEWTABLE message named `name` (the reply to [`get_table`]).
pub fn table_info(m: &NftMsg, name: &str) -> Option<TableInfo> {
    if m.kind != msg::NEWTABLE || m.family != NFPROTO_INET || attr_str(m.attrs, NFTA_TABLE_NAME)? != name {
        return None;
    }
    let flags = attr_be32(m.attrs, NFTA_TABLE_FLAGS).unwrap_or(0);
    let owner = if flags & TABLE_F_OWNER != 0 { attr_be32(m.attrs, NFTA_TABLE_OWNER) } else { None };
    Some(TableInfo { flags, owner })
}

/// What the kernel says about a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainInfo {
    pub name: String,
    /// Hook number and priority; `None` for a regular (non-base) chain.
    pub hook: Option<(u32, i32)>,
    pub kind: Option<String>,
}

/// A chain of table `table` out of a NEWCHAIN message (a dump entry).
pub fn chain_info(m: &NftMsg, table: &str) -> Option<ChainInfo> {
    if m.kind != msg::NEWCHAIN || m.family != NFPROTO_INET || attr_str(m.attrs, NFTA_CHAIN_TABLE)? != table {
        return None;
    }
    let hook = attr(m.attrs, NFTA_CHAIN_HOOK)
        .and_then(|h| Some((attr_be32(h, NFTA_HOOK_HOOKNUM)?, attr_be32(h, NFTA_HOOK_PRIORITY)? as i32)));
    Some(ChainInfo {
        name: attr_str(m.attrs, NFTA_CHAIN_NAME)?.to_owned(),
        hook,
        kind: attr_str(m.attrs, NFTA_CHAIN_TYPE).map(str::to_owned),
    })
}

/// Whether an event touches the `inet` table `table`: every nf_tables object message (table,
/// chain, rule, set, element, object, flowtable) carries its table's name as attribute 1.
pub fn touches(m: &NftMsg, table: &str) -> bool {
    m.kind != msg::NEWGEN && m.family == NFPROTO_INET && attr_str(m.attrs, 1) == Some(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::killswitch::{KillSwitchPlan, rules};

    #[test]
    fn a_batch_is_framed_begin_messages_end() {
        let plan = KillSwitchPlan::new("198.18.0.1".parse().unwrap(), 1, 2, "hf0").unwrap();
        let mut b = Batch::new(100);
        b.new_table("holdfast", TABLE_F_OWNER | TABLE_F_PERSIST);
        b.new_chain("holdfast", "output");
        b.flush_table("holdfast");
        let rs = rules::chains(&plan);
        b.new_rule("holdfast", "output", &rs.output[2]);
        let (bytes, msgs) = b.finish();
        assert_eq!(msgs.iter().map(|m| m.0).collect::<Vec<_>>(), [101, 102, 103, 104]);
        assert!(msgs[3].1.contains("gateway control"));
        // Walk the frames: lengths add up, types in order, every length 4-aligned.
        let mut types = Vec::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let len = u32_at(rest, 0).unwrap() as usize;
            assert_eq!(len % 4, 0);
            types.push(u16_at(rest, 4).unwrap());
            rest = &rest[len..];
        }
        let t = |m| nft_type(m);
        assert_eq!(types, [0x10, t(msg::NEWTABLE), t(msg::NEWCHAIN), t(msg::DELRULE), t(msg::NEWRULE), 0x11]);
        // The table message carries its flags big-endian.
        let table = messages(&bytes).nth(1).unwrap();
        let Reply::Nft(m) = table else { panic!("{table:?}") };
        assert_eq!(table_info(&m, "holdfast"), Some(TableInfo { flags: 6, owner: None }));
        assert!(touches(&m, "holdfast") && !touches(&m, "other"));
    }

    #[test]
    fn a_rule_carries_its_expressions_and_comment() {
        let plan = KillSwitchPlan::new("198.18.0.1".parse().unwrap(), 1, 2, "hf0").unwrap();
        let rule = &rules::chains(&plan).output[0]; // oifname "lo" accept
        let mut b = Batch::new(1);
        b.new_rule("holdfast", "output", rule);
        let (bytes, _) = b.finish();
        let Some(Reply::Nft(m)) = messages(&bytes).nth(1) else { panic!() };
        assert_eq!(attr_str(m.attrs, NFTA_RULE_CHAIN), Some("output"));
        let names: Vec<&str> = attrs(attr(m.attrs, NFTA_RULE_EXPRESSIONS).unwrap())
            .map(|(_, el)| attr_str(el, NFTA_EXPR_NAME).unwrap())
            .collect();
        assert_eq!(names, ["meta", "cmp", "immediate"]);
        assert_eq!(attr(m.attrs, NFTA_RULE_USERDATA).unwrap(), &b"\x00\x09loopback\x00"[..]);
    }

    #[test]
    fn replies_decode_and_garbage_is_skipped() {
        // An ack for seq 7, an error (EPERM) for seq 8, then a truncated header.
        let mut buf = Vec::new();
        for (seq, err) in [(7u32, 0i32), (8, -1)] {
            buf.extend_from_slice(&36u32.to_ne_bytes());
            buf.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            buf.extend_from_slice(&0u16.to_ne_bytes());
            buf.extend_from_slice(&seq.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            buf.extend_from_slice(&err.to_ne_bytes());
            buf.extend_from_slice(&[0; 16]);
        }
        buf.extend_from_slice(&[200, 0, 0]);
        let got: Vec<Reply> = messages(&buf).collect();
        assert_eq!(got, [Reply::Ack { seq: 7, errno: 0 }, Reply::Ack { seq: 8, errno: 1 }]);
        for cut in 0..buf.len() {
            let _ = messages(&buf[..cut]).count();
        }
        assert_eq!(attrs(&[255, 255, 1, 0]).count(), 0);
        assert_eq!(attrs(&[4, 0, 1, 0, 9]).count(), 1);
    }
}
