//! The little of the D-Bus wire protocol the agent needs to talk to systemd over its
//! private peer-to-peer socket: `AUTH EXTERNAL`, method calls with string arguments, and
//! decoding of any reply.
//!
//! Hand-written because zbus (5.19 and 6.2 measured) cannot talk to that socket: sd-bus
//! stamps every reply sent on a direct connection with the sender
//! `org.freedesktop.systemd1`, a well-known name, and zbus refuses it as an invalid unique
//! name (5.19 panics in its socket reader, 6.2 fails the call).
use std::{fmt, io, time::Duration};

use anyhow::{anyhow, bail, Context as _, Result};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixStream,
};

/// The spec's limit on a message's size (2^27 bytes).
const MAX_MESSAGE: usize = 128 << 20;

const METHOD_CALL: u8 = 1;
const METHOD_RETURN: u8 = 2;
const ERROR: u8 = 3;

const FIELD_PATH: u8 = 1;
const FIELD_INTERFACE: u8 = 2;
const FIELD_MEMBER: u8 = 3;
const FIELD_ERROR_NAME: u8 = 4;
const FIELD_REPLY_SERIAL: u8 = 5;
const FIELD_DESTINATION: u8 = 6;
const FIELD_SIGNATURE: u8 = 8;

/// A decoded D-Bus value. Strings, object paths and signatures all become [`Value::Str`].
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Byte(u8),
    Bool(bool),
    I16(i16),
    U16(u16),
    I32(i32),
    U32(u32),
    I64(i64),
    U64(u64),
    Double(f64),
    Str(String),
    /// An index into the message's file descriptors (`h`); we never receive any.
    Fd(u32),
    Array(Vec<Value>),
    Struct(Vec<Value>),
    DictEntry(Box<Value>, Box<Value>),
    Variant(Box<Value>),
}

impl Value {
    /// The value inside a variant (or the value itself).
    pub fn unwrap_variant(self) -> Value {
        match self {
            Value::Variant(v) => v.unwrap_variant(),
            v => v,
        }
    }

    pub fn into_string(self) -> Option<String> {
        match self.unwrap_variant() {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Variant(v) => v.as_u64(),
            Value::Byte(v) => Some(u64::from(*v)),
            Value::U16(v) => Some(u64::from(*v)),
            Value::U32(v) => Some(u64::from(*v)),
            Value::U64(v) => Some(*v),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Variant(v) => v.as_bool(),
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The strings of an `as` (or of any array holding only strings).
    pub fn into_strings(self) -> Option<Vec<String>> {
        match self.unwrap_variant() {
            Value::Array(items) => items.into_iter().map(Value::into_string).collect(),
            _ => None,
        }
    }

    /// The fields of a struct.
    pub fn into_fields(self) -> Option<Vec<Value>> {
        match self.unwrap_variant() {
            Value::Struct(fields) => Some(fields),
            _ => None,
        }
    }
}

/// An error reply from the peer: `org.freedesktop.DBus.Error.UnknownProperty` and the like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodError {
    pub name: String,
    pub message: String,
}

impl fmt::Display for MethodError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{} ({})", self.message, self.name)
        }
    }
}

impl std::error::Error for MethodError {}

/// One method call.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub destination: Option<&'a str>,
    pub path: &'a str,
    pub interface: &'a str,
    pub member: &'a str,
    /// Arguments, all strings (signature `s…`): all that systemd's methods used here take.
    pub args: &'a [&'a str],
}

/// An authenticated connection; calls are strictly one at a time.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    /// Bytes read past the end of what has been consumed.
    buf: Vec<u8>,
    serial: u32,
}

impl Connection {
    /// Authenticates as `uid` with `EXTERNAL`, which the server checks against the
    /// socket's `SO_PEERCRED`.
    ///
    /// `BEGIN` goes out with `AUTH`, as sd-bus clients send it: an sd-bus server that reads
    /// `BEGIN` and the first message in one go leaves the message in its buffer and waits
    /// for more input that never comes (measured with systemd 252: most first calls hung
    /// when `BEGIN` was sent after `OK`). Pipelined, the server handles `BEGIN` right
    /// after writing `OK`, before our first message can arrive.
    pub async fn authenticate(stream: UnixStream, uid: u32) -> Result<Self> {
        let mut conn = Self {
            stream,
            buf: Vec::new(),
            serial: 0,
        };
        let hex: String = uid
            .to_string()
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect();
        conn.stream
            .write_all(format!("\0AUTH EXTERNAL {hex}\r\nBEGIN\r\n").as_bytes())
            .await
            .context("sending AUTH")?;
        let line = conn.read_line().await.context("reading the AUTH reply")?;
        if !line.starts_with("OK ") {
            bail!("authentication refused: {line:?}");
        }
        Ok(conn)
    }

    async fn read_line(&mut self) -> Result<String> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 2);
                return Ok(line);
            }
            if self.buf.len() > 4096 {
                bail!("overlong line in the authentication exchange");
            }
            self.fill().await?;
        }
    }

    /// Reads more bytes into the buffer; end of stream is an `UnexpectedEof` I/O error, so
    /// that callers can tell a closed connection from other failures.
    async fn fill(&mut self) -> Result<()> {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk).await?;
        log::trace!("read {n} bytes from systemd");
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Calls a method and waits for its reply, skipping whatever else arrives meanwhile
    /// (systemd sends its signals to every private connection, subscribed or not). Gives
    /// the reply's body values; an error reply is a [`MethodError`] in the chain.
    pub async fn call(&mut self, call: &Call<'_>, timeout: Duration) -> Result<Vec<Value>> {
        self.serial = self.serial.wrapping_add(1).max(1);
        let serial = self.serial;
        let msg = encode_call(call, serial)?;
        let exchange = async {
            self.stream.write_all(&msg).await?;
            loop {
                let msg = self.read_message().await?;
                if msg.reply_serial != Some(serial) {
                    continue;
                }
                return match msg.kind {
                    METHOD_RETURN => Ok(msg.body),
                    ERROR => {
                        let message = match msg.body.into_iter().next() {
                            Some(Value::Str(s)) => s,
                            _ => String::new(),
                        };
                        Err(anyhow::Error::new(MethodError {
                            name: msg.error_name.unwrap_or_default(),
                            message,
                        }))
                    }
                    other => bail!("unexpected message type {other} in reply"),
                };
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| anyhow!("no reply within {timeout:?}"))?
    }

    async fn read_message(&mut self) -> Result<Message> {
        loop {
            if let Some(total) = message_len(&self.buf)? {
                if self.buf.len() >= total {
                    let msg = decode_message(&self.buf[..total])?;
                    self.buf.drain(..total);
                    log::trace!(
                        "D-Bus message type {} reply to {:?}: {:?}",
                        msg.kind,
                        msg.reply_serial,
                        msg.body
                    );
                    return Ok(msg);
                }
            }
            self.fill().await?;
        }
    }
}

/// True when `err` says the peer closed the connection (as opposed to refusing a call).
pub fn is_disconnect(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<io::Error>().is_some_and(|e| {
            matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::NotConnected
            )
        })
    })
}

/// The error name of a [`MethodError`] in `err`'s chain.
pub fn error_name(err: &anyhow::Error) -> Option<&str> {
    err.chain()
        .find_map(|e| e.downcast_ref::<MethodError>())
        .map(|e| e.name.as_str())
}

#[derive(Debug)]
struct Message {
    kind: u8,
    reply_serial: Option<u32>,
    error_name: Option<String>,
    body: Vec<Value>,
}

/// Writer of one little-endian message; offsets are from the message start, which is what
/// D-Bus alignment is relative to.
struct Writer(Vec<u8>);

impl Writer {
    fn pad(&mut self, align: usize) {
        self.0.resize(self.0.len().next_multiple_of(align), 0);
    }

    fn u32(&mut self, v: u32) {
        self.pad(4);
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    fn string(&mut self, s: &str) -> Result<()> {
        if s.contains('\0') {
            bail!("string {s:?} contains a NUL byte");
        }
        self.u32(u32::try_from(s.len()).context("string too long")?);
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(0);
        Ok(())
    }

    fn signature(&mut self, s: &str) -> Result<()> {
        let len = u8::try_from(s.len()).context("signature too long")?;
        self.0.push(len);
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(0);
        Ok(())
    }

    /// One header field: a `(yv)` struct.
    fn field(&mut self, code: u8, sig: &str, value: &str) -> Result<()> {
        self.pad(8);
        self.0.push(code);
        self.signature(sig)?;
        match sig {
            "g" => self.signature(value),
            _ => self.string(value),
        }
    }
}

fn encode_call(call: &Call<'_>, serial: u32) -> Result<Vec<u8>> {
    let mut body = Writer(Vec::new());
    for arg in call.args {
        body.string(arg)?;
    }
    let body = body.0;

    let mut w = Writer(Vec::with_capacity(256 + body.len()));
    w.0.extend_from_slice(&[b'l', METHOD_CALL, 0, 1]);
    w.u32(u32::try_from(body.len()).context("message body too long")?);
    w.u32(serial);
    // Header fields array: length placeholder, then the 8-aligned structs.
    w.u32(0);
    let start = w.0.len();
    w.field(FIELD_PATH, "o", call.path)?;
    w.field(FIELD_INTERFACE, "s", call.interface)?;
    w.field(FIELD_MEMBER, "s", call.member)?;
    if let Some(dest) = call.destination {
        w.field(FIELD_DESTINATION, "s", dest)?;
    }
    if !call.args.is_empty() {
        w.field(FIELD_SIGNATURE, "g", &"s".repeat(call.args.len()))?;
    }
    // The array's length counts from its first element (already 8-aligned: offset 16).
    let fields_len = u32::try_from(w.0.len() - start).context("header too long")?;
    w.0[12..16].copy_from_slice(&fields_len.to_le_bytes());
    w.pad(8);
    w.0.extend_from_slice(&body);
    Ok(w.0)
}

/// The whole length of the message at the start of `buf`, once its fixed part is in.
fn message_len(buf: &[u8]) -> Result<Option<usize>> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let big = match buf[0] {
        b'l' => false,
        b'B' => true,
        other => bail!("bad endianness byte {other:#x} in message"),
    };
    let word = |at: usize| {
        let b = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        (if big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }) as usize
    };
    let (body_len, fields_len) = (word(4), word(12));
    let total = (16 + fields_len).next_multiple_of(8) + body_len;
    if total > MAX_MESSAGE {
        bail!("message of {total} bytes exceeds the D-Bus limit");
    }
    Ok(Some(total))
}

fn decode_message(buf: &[u8]) -> Result<Message> {
    let mut r = Reader {
        buf,
        pos: 12,
        big: buf[0] == b'B',
    };
    let kind = buf[1];
    let fields = r.value_of("a(yv)", 0)?;
    let body_start = r.pos.next_multiple_of(8);
    let mut msg = Message {
        kind,
        reply_serial: None,
        error_name: None,
        body: Vec::new(),
    };
    let mut signature = String::new();
    let Value::Array(fields) = fields else {
        unreachable!("a(yv) decodes to an array")
    };
    for field in fields {
        let Value::Struct(mut pair) = field else {
            unreachable!("(yv) decodes to a struct")
        };
        let value = pair.pop().map(Value::unwrap_variant);
        match (pair.pop(), value) {
            (Some(Value::Byte(FIELD_REPLY_SERIAL)), Some(Value::U32(s))) => {
                msg.reply_serial = Some(s);
            }
            (Some(Value::Byte(FIELD_ERROR_NAME)), Some(Value::Str(s))) => msg.error_name = Some(s),
            (Some(Value::Byte(FIELD_SIGNATURE)), Some(Value::Str(s))) => signature = s,
            _ => {}
        }
    }
    r.pos = body_start;
    let mut sig = signature.as_str();
    while !sig.is_empty() {
        let (one, rest) = split_type(sig)?;
        msg.body.push(r.value_of(one, 0)?);
        sig = rest;
    }
    if r.pos != buf.len() {
        bail!("message body has {} bytes left over", buf.len() - r.pos);
    }
    Ok(msg)
}

/// Splits the first complete type off a signature.
fn split_type(sig: &str) -> Result<(&str, &str)> {
    let bytes = sig.as_bytes();
    let mut i = 0;
    while bytes.get(i) == Some(&b'a') {
        i += 1;
    }
    let end = match bytes.get(i) {
        Some(b'(' | b'{') => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match bytes.get(j) {
                    Some(b'(' | b'{') => depth += 1,
                    Some(b')' | b'}') => {
                        depth -= 1;
                        if depth == 0 {
                            break j + 1;
                        }
                    }
                    Some(_) => {}
                    None => bail!("unbalanced signature {sig:?}"),
                }
                j += 1;
            }
        }
        Some(_) => i + 1,
        None => bail!("incomplete signature {sig:?}"),
    };
    Ok(sig.split_at(end))
}

fn alignment(sig: &str) -> usize {
    match sig.as_bytes().first() {
        Some(b'n' | b'q') => 2,
        Some(b'b' | b'i' | b'u' | b'h' | b's' | b'o' | b'a') => 4,
        Some(b'x' | b't' | b'd' | b'(' | b'{') => 8,
        _ => 1,
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    big: bool,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or_else(|| anyhow!("truncated message"))?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn align(&mut self, to: usize) -> Result<()> {
        let target = self.pos.next_multiple_of(to);
        self.take(target - self.pos)?;
        Ok(())
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N]> {
        self.align(N)?;
        let mut b: [u8; N] = self.take(N)?.try_into().expect("took N bytes");
        if self.big {
            b.reverse();
        }
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.fixed()?))
    }

    fn text(&mut self, len: usize) -> Result<String> {
        let bytes = self.take(len + 1)?;
        String::from_utf8(bytes[..len].to_vec()).context("string is not UTF-8")
    }

    /// Decodes one value of the single complete type `sig`.
    fn value_of(&mut self, sig: &str, depth: usize) -> Result<Value> {
        // The spec's limit is 32 nested arrays plus 32 nested structs.
        if depth > 64 {
            bail!("value nested too deeply");
        }
        Ok(match sig.as_bytes()[0] {
            b'y' => Value::Byte(self.take(1)?[0]),
            b'b' => match self.u32()? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                other => bail!("boolean with value {other}"),
            },
            b'n' => Value::I16(i16::from_le_bytes(self.fixed()?)),
            b'q' => Value::U16(u16::from_le_bytes(self.fixed()?)),
            b'i' => Value::I32(i32::from_le_bytes(self.fixed()?)),
            b'u' => Value::U32(self.u32()?),
            b'h' => Value::Fd(self.u32()?),
            b'x' => Value::I64(i64::from_le_bytes(self.fixed()?)),
            b't' => Value::U64(u64::from_le_bytes(self.fixed()?)),
            b'd' => Value::Double(f64::from_le_bytes(self.fixed()?)),
            b's' | b'o' => {
                let len = self.u32()? as usize;
                Value::Str(self.text(len)?)
            }
            b'g' => {
                let len = usize::from(self.take(1)?[0]);
                Value::Str(self.text(len)?)
            }
            b'v' => {
                let len = usize::from(self.take(1)?[0]);
                let inner = self.text(len)?;
                let (one, rest) = split_type(&inner)?;
                if !rest.is_empty() {
                    bail!("variant signature {inner:?} holds more than one type");
                }
                Value::Variant(Box::new(self.value_of(one, depth + 1)?))
            }
            b'a' => {
                let len = self.u32()? as usize;
                let elem = &sig[1..];
                self.align(alignment(elem))?;
                let end = self.pos + len;
                if end > self.buf.len() {
                    bail!("truncated array");
                }
                let mut items = Vec::new();
                while self.pos < end {
                    items.push(self.value_of(elem, depth + 1)?);
                }
                if self.pos != end {
                    bail!("array element overruns its array");
                }
                Value::Array(items)
            }
            open @ (b'(' | b'{') => {
                self.align(8)?;
                let mut inner = &sig[1..sig.len() - 1];
                let mut fields = Vec::new();
                while !inner.is_empty() {
                    let (one, rest) = split_type(inner)?;
                    fields.push(self.value_of(one, depth + 1)?);
                    inner = rest;
                }
                if open == b'{' {
                    let [k, v]: [Value; 2] = fields
                        .try_into()
                        .map_err(|_| anyhow!("dict entry without two fields"))?;
                    Value::DictEntry(Box::new(k), Box::new(v))
                } else {
                    Value::Struct(fields)
                }
            }
            other => bail!("unsupported type code {:?}", char::from(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a little-endian reply with a body written by `body`.
    fn reply(kind: u8, serial: u32, sig: &str, body: &[u8], error: Option<&str>) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        w.0.extend_from_slice(&[b'l', kind, 1, 1]);
        w.u32(body.len() as u32);
        w.u32(77);
        w.u32(0);
        let start = w.0.len();
        // REPLY_SERIAL (u)
        w.pad(8);
        w.0.push(FIELD_REPLY_SERIAL);
        w.signature("u").unwrap();
        w.u32(serial);
        // SENDER, a well-known name as sd-bus sends it on direct connections.
        w.field(7, "s", "org.freedesktop.systemd1").unwrap();
        if let Some(e) = error {
            w.field(FIELD_ERROR_NAME, "s", e).unwrap();
        }
        if !sig.is_empty() {
            w.field(FIELD_SIGNATURE, "g", sig).unwrap();
        }
        let len = (w.0.len() - start) as u32;
        w.0[12..16].copy_from_slice(&len.to_le_bytes());
        w.pad(8);
        w.0.extend_from_slice(body);
        w.0
    }

    #[test]
    fn encodes_a_method_call_as_sd_bus_would() {
        let msg = encode_call(
            &Call {
                destination: Some("org.freedesktop.systemd1"),
                path: "/org/freedesktop/systemd1",
                interface: "org.freedesktop.systemd1.Manager",
                member: "LoadUnit",
                args: &["x.service"],
            },
            3,
        )
        .unwrap();
        assert_eq!(&msg[..4], &[b'l', 1, 0, 1]);
        assert_eq!(u32::from_le_bytes(msg[8..12].try_into().unwrap()), 3);
        // body: u32 length 9, "x.service", NUL
        let body_len = u32::from_le_bytes(msg[4..8].try_into().unwrap()) as usize;
        assert_eq!(body_len, 4 + 9 + 1);
        assert_eq!(&msg[msg.len() - body_len..], b"\x09\0\0\0x.service\0");
        assert_eq!(message_len(&msg).unwrap(), Some(msg.len()));
        // Our own decoder reads it back (a method call has no reply serial).
        let decoded = decode_message(&msg).unwrap();
        assert_eq!(decoded.kind, METHOD_CALL);
        assert_eq!(decoded.body, vec![Value::Str("x.service".into())]);
    }

    #[test]
    fn decodes_a_variant_reply() {
        // v holding s "/system.slice/x.service"
        let mut b = Writer(Vec::new());
        b.signature("s").unwrap();
        b.string("/system.slice/x.service").unwrap();
        let msg = reply(METHOD_RETURN, 5, "v", &b.0, None);
        let m = decode_message(&msg).unwrap();
        assert_eq!(m.reply_serial, Some(5));
        assert_eq!(
            m.body[0].clone().into_string().as_deref(),
            Some("/system.slice/x.service")
        );
    }

    #[test]
    fn decodes_arrays_structs_and_u64() {
        // v holding (ss), then at, then as with two entries, then an empty a(yv)
        let mut b = Writer(Vec::new());
        b.signature("(ss)").unwrap();
        b.pad(8);
        b.string("org.freedesktop.systemd1.NoSuchUnit").unwrap();
        b.string("Unit x.service not found.").unwrap();
        // at [42]
        b.u32(8);
        b.pad(8);
        b.0.extend_from_slice(&42u64.to_le_bytes());
        // as ["a", "bc"]
        let at = b.0.len();
        b.u32(0);
        let start = b.0.len();
        b.string("a").unwrap();
        b.string("bc").unwrap();
        let len = (b.0.len() - start) as u32;
        b.0[at..at + 4].copy_from_slice(&len.to_le_bytes());
        // empty a(yv): length 0, still padded to 8
        b.u32(0);
        b.pad(8);
        let msg = reply(METHOD_RETURN, 1, "vatasa(yv)", &b.0, None);
        let m = decode_message(&msg).unwrap();
        let fields = m.body[0].clone().into_fields().unwrap();
        assert_eq!(
            fields[1].clone().into_string().unwrap(),
            "Unit x.service not found."
        );
        assert_eq!(m.body[1], Value::Array(vec![Value::U64(42)]));
        assert_eq!(
            m.body[2].clone().into_strings().unwrap(),
            vec!["a".to_string(), "bc".to_string()]
        );
        assert_eq!(m.body[3], Value::Array(vec![]));
    }

    #[test]
    fn decodes_dicts_and_big_endian() {
        // a{sv} with one entry "MainPID" -> u 42, big-endian
        let mut body = Vec::new();
        body.extend_from_slice(&[0, 0, 0, 0]); // array length, patched below
        body.extend_from_slice(&[0, 0, 0, 0]); // pad to 8 (body starts 8-aligned)
        let start = body.len();
        body.extend_from_slice(&7u32.to_be_bytes());
        body.extend_from_slice(b"MainPID\0");
        body.extend_from_slice(&[1, b'u', 0, 0]); // variant sig "u", then pad to 4
        body.extend_from_slice(&42u32.to_be_bytes());
        let len = (body.len() - start) as u32;
        body[..4].copy_from_slice(&len.to_be_bytes());
        let mut r = Reader {
            buf: &body,
            pos: 0,
            big: true,
        };
        let v = r.value_of("a{sv}", 0).unwrap();
        let Value::Array(entries) = v else { panic!() };
        let Value::DictEntry(k, v) = &entries[0] else {
            panic!()
        };
        assert_eq!(**k, Value::Str("MainPID".into()));
        assert_eq!(v.as_u64(), Some(42));
    }

    #[test]
    fn rejects_malformed_input() {
        let mut b = Writer(Vec::new());
        b.u32(1000); // a string claiming 1000 bytes
        let msg = reply(METHOD_RETURN, 1, "s", &b.0, None);
        assert!(decode_message(&msg).is_err());
        assert!(split_type("a(ss").is_err());
        assert!(message_len(b"xxxxxxxxxxxxxxxxxxxx").is_err());
        assert_eq!(message_len(b"l\x02").unwrap(), None);
    }

    #[tokio::test]
    async fn call_skips_signals_and_maps_errors() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let server = tokio::spawn(async move {
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while !line.ends_with(b"\r\n") {
                theirs.read_exact(&mut byte).await.unwrap();
                line.push(byte[0]);
            }
            assert_eq!(line, b"\0AUTH EXTERNAL 30\r\n");
            let mut begin = [0u8; 7];
            theirs.read_exact(&mut begin).await.unwrap();
            assert_eq!(&begin, b"BEGIN\r\n");
            theirs.write_all(b"OK 0123456789abcdef\r\n").await.unwrap();
            // First call: a signal (no reply serial) comes first, then an error reply.
            let mut head = [0u8; 16];
            theirs.read_exact(&mut head).await.unwrap();
            let total = message_len(&head).unwrap().unwrap();
            let mut rest = vec![0u8; total - 16];
            theirs.read_exact(&mut rest).await.unwrap();
            let mut signal = reply(4, 0, "", &[], None);
            // turn the REPLY_SERIAL field code into an unrelated one (PATH-like noise)
            signal[16] = 9;
            theirs.write_all(&signal).await.unwrap();
            let mut b = Writer(Vec::new());
            b.string("Unit x.service not loaded.").unwrap();
            let err = reply(
                ERROR,
                1,
                "s",
                &b.0,
                Some("org.freedesktop.systemd1.NoSuchUnit"),
            );
            theirs.write_all(&err).await.unwrap();
            // Then hang up.
        });
        let mut conn = Connection::authenticate(ours, 0).await.unwrap();
        let call = Call {
            destination: None,
            path: "/org/freedesktop/systemd1",
            interface: "org.freedesktop.systemd1.Manager",
            member: "GetUnit",
            args: &["x.service"],
        };
        let err = conn.call(&call, Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(
            error_name(&err),
            Some("org.freedesktop.systemd1.NoSuchUnit")
        );
        assert!(err.to_string().contains("not loaded"), "{err}");
        server.await.unwrap();
        let err = conn.call(&call, Duration::from_secs(5)).await.unwrap_err();
        assert!(is_disconnect(&err), "{err:#}");
    }
}
