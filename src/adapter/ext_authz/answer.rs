//! The `CheckResponse` Arbiter sends Envoy, written straight to protobuf
//! bytes.
//!
//! Why not `envoy_types`' `CheckResponse` through prost: building it (a
//! SipHash `HashMap` for the dynamic metadata, a `String` per header) and
//! encoding it (prost recomputes nested lengths at every level) for a
//! ~280-byte answer; writing the bytes took an ext_authz `Check` from 96,485
//! to 89,848 instructions (callgrind, `benches/load/instructions.sh`).
//!
//! Invariants:
//! - the bytes decode, with `envoy_types`' `CheckResponse`, to the message
//!   the service means (the tests decode them and compare field by field);
//! - proto3 as prost writes it: a scalar or string field at its default is
//!   left out, a set message field or oneof member is written even when
//!   empty, map entries never have a default key or value here.

/// An encoded `CheckResponse`, and whether it lets the request through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    bytes: Vec<u8>,
    allowed: bool,
}

impl Answer {
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn allowed(&self) -> bool {
        self.allowed
    }
}

/// A value in the answer's `dynamic_metadata` (a `google.protobuf.Struct`).
#[derive(Debug, Clone, Copy)]
pub enum MetadataValue<'a> {
    String(&'a str),
    /// A list of strings.
    Strings(&'a [String]),
}

const LEN: u8 = 2;
const VARINT: u8 = 0;
/// `HeaderValueOption.append_action`: `OVERWRITE_IF_EXISTS_OR_ADD`, so a
/// client cannot smuggle in a header Arbiter sets.
const OVERWRITE_IF_EXISTS_OR_ADD: i32 = 2;

/// Appends protobuf fields to a buffer.
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn varint(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.buf.push((value as u8) | 0x80);
            value >>= 7;
        }
        self.buf.push(value as u8);
    }

    fn key(&mut self, field: u32, wire_type: u8) {
        self.varint(u64::from(field) << 3 | u64::from(wire_type));
    }

    /// A `string` field; left out when empty (proto3).
    fn string(&mut self, field: u32, text: &str) {
        if !text.is_empty() {
            self.string_always(field, text);
        }
    }

    /// A string that is written even when empty (a oneof member).
    fn string_always(&mut self, field: u32, text: &str) {
        self.key(field, LEN);
        self.varint(text.len() as u64);
        self.buf.extend_from_slice(text.as_bytes());
    }

    /// An `int32` or enum field; left out when 0 (proto3).
    fn int(&mut self, field: u32, value: i32) {
        if value != 0 {
            self.key(field, VARINT);
            // Negative values as prost writes them: sign-extended.
            self.varint(i64::from(value) as u64);
        }
    }

    /// A message field: `write` appends its fields; the length prefix is
    /// filled in after (one byte below 128, the usual case, else the bytes
    /// are moved up to make room).
    fn message(&mut self, field: u32, write: impl FnOnce(&mut Writer)) {
        self.key(field, LEN);
        let at = self.buf.len();
        self.buf.push(0);
        write(self);
        let len = self.buf.len() - at - 1;
        if len < 0x80 {
            self.buf[at] = len as u8;
        } else {
            let mut prefix = Writer {
                buf: Vec::with_capacity(5),
            };
            prefix.varint(len as u64);
            self.buf.splice(at..=at, prefix.buf);
        }
    }

    /// A `HeaderValueOption` that overwrites.
    fn header(&mut self, field: u32, name: &str, value: &str) {
        self.message(field, |option| {
            option.message(1, |header| {
                header.string(1, name);
                header.string(2, value);
            });
            option.int(3, OVERWRITE_IF_EXISTS_OR_ADD);
        });
    }

    /// `google.protobuf.Struct` fields (field 1, a map of `Value`).
    fn metadata(&mut self, field: u32, entries: &[(&str, MetadataValue<'_>)]) {
        self.message(field, |fields| {
            for (name, value) in entries {
                fields.message(1, |entry| {
                    entry.string(1, name);
                    entry.message(2, |pb_value| match value {
                        MetadataValue::String(text) => pb_value.string_always(3, text),
                        MetadataValue::Strings(items) => pb_value.message(6, |list| {
                            for item in *items {
                                list.message(1, |item_value| item_value.string_always(3, item));
                            }
                        }),
                    });
                });
            }
        });
    }
}

fn writer() -> Writer {
    Writer {
        buf: Vec::with_capacity(320),
    }
}

/// Status OK with an `OkHttpResponse` adding `headers` (name, value) and
/// the given dynamic metadata.
pub fn ok<'h>(
    headers: impl IntoIterator<Item = (&'h str, &'h str)>,
    metadata: &[(&str, MetadataValue<'_>)],
) -> Answer {
    let mut out = writer();
    // `status`: code 0, present.
    out.message(1, |_| {});
    out.message(3, |ok| {
        for (name, value) in headers {
            ok.header(2, name, value);
        }
    });
    out.metadata(4, metadata);
    Answer {
        bytes: out.buf,
        allowed: true,
    }
}

/// What a `DeniedHttpResponse` answer carries.
#[derive(Debug, Clone, Copy)]
pub struct Denied<'a> {
    /// gRPC code in `CheckResponse.status`, with its message.
    pub grpc_code: i32,
    pub grpc_message: &'a str,
    /// HTTP status Envoy sends the client.
    pub http_status: i32,
    pub body: &'a str,
}

/// A denial: `status` with a non-OK code and a `DeniedHttpResponse`.
pub fn denied<'h>(
    denied: Denied<'_>,
    headers: impl IntoIterator<Item = (&'h str, &'h str)>,
    metadata: &[(&str, MetadataValue<'_>)],
) -> Answer {
    let mut out = writer();
    out.message(1, |status| {
        status.int(1, denied.grpc_code);
        status.string(2, denied.grpc_message);
    });
    out.message(2, |response| {
        response.message(1, |status| status.int(1, denied.http_status));
        for (name, value) in headers {
            response.header(2, name, value);
        }
        response.string(3, denied.body);
    });
    out.metadata(4, metadata);
    Answer {
        bytes: out.buf,
        allowed: false,
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
    use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
    use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
    use envoy_types::pb::google::protobuf::value::Kind;
    use prost::Message;

    use super::*;

    fn decode(answer: &Answer) -> CheckResponse {
        CheckResponse::decode(answer.bytes()).unwrap()
    }

    fn string(kind: &Option<Kind>) -> &str {
        match kind {
            Some(Kind::StringValue(text)) => text,
            other => panic!("not a string: {other:?}"),
        }
    }

    #[test]
    fn an_allow_decodes_as_envoy_types_reads_it() {
        let long = "v".repeat(300);
        let policies = vec!["viewer-can-read".to_string(), String::new()];
        let answer = ok(
            [
                ("x-arbiter-decision-id", "id-1"),
                ("x-long", long.as_str()),
                ("x-empty", ""),
            ],
            &[
                ("decision_id", MetadataValue::String("id-1")),
                ("policies", MetadataValue::Strings(&policies)),
                ("empty", MetadataValue::String("")),
                ("none", MetadataValue::Strings(&[])),
            ],
        );
        assert!(answer.allowed());
        let response = decode(&answer);
        assert_eq!(response.status.unwrap().code, 0);
        let Some(HttpResponse::OkResponse(ok)) = response.http_response else {
            panic!("not an OkHttpResponse");
        };
        let headers: Vec<(String, String, i32)> = ok
            .headers
            .iter()
            .map(|option| {
                let header = option.header.clone().unwrap();
                (header.key, header.value, option.append_action)
            })
            .collect();
        let overwrite = HeaderAppendAction::OverwriteIfExistsOrAdd as i32;
        assert_eq!(
            headers,
            [
                ("x-arbiter-decision-id".into(), "id-1".into(), overwrite),
                ("x-long".into(), long.clone(), overwrite),
                ("x-empty".into(), String::new(), overwrite),
            ]
        );
        // The deprecated `append` stays unset: `append_action` decides.
        #[allow(deprecated)]
        let appends = ok
            .headers
            .iter()
            .filter(|option| option.append.is_some())
            .count();
        assert_eq!(appends, 0);
        let fields = response.dynamic_metadata.unwrap().fields;
        assert_eq!(fields.len(), 4);
        assert_eq!(string(&fields["decision_id"].kind), "id-1");
        assert_eq!(string(&fields["empty"].kind), "");
        let Some(Kind::ListValue(list)) = &fields["policies"].kind else {
            panic!("policies is not a list");
        };
        let names: Vec<&str> = list.values.iter().map(|v| string(&v.kind)).collect();
        assert_eq!(names, ["viewer-can-read", ""]);
        let Some(Kind::ListValue(none)) = &fields["none"].kind else {
            panic!("none is not a list");
        };
        assert!(none.values.is_empty());
    }

    #[test]
    fn a_denial_decodes_as_envoy_types_reads_it() {
        let body = r#"{"decision_id":"id-2","decision":"deny"}"#;
        let answer = denied(
            Denied {
                grpc_code: 16,
                grpc_message: "unauthenticated",
                http_status: 401,
                body,
            },
            [("www-authenticate", "Bearer realm=\"docs\"")],
            &[("decision_id", MetadataValue::String("id-2"))],
        );
        assert!(!answer.allowed());
        let response = decode(&answer);
        let status = response.status.unwrap();
        assert_eq!(
            (status.code, status.message.as_str()),
            (16, "unauthenticated")
        );
        let Some(HttpResponse::DeniedResponse(denied)) = response.http_response else {
            panic!("not a DeniedHttpResponse");
        };
        assert_eq!(denied.status.unwrap().code, 401);
        assert_eq!(denied.body, body);
        let header = denied.headers[0].header.clone().unwrap();
        assert_eq!(header.key, "www-authenticate");
        assert_eq!(header.value, "Bearer realm=\"docs\"");
        assert_eq!(
            string(&response.dynamic_metadata.unwrap().fields["decision_id"].kind),
            "id-2"
        );
    }

    /// Lengths of 128 and more take a longer prefix, at every level.
    #[test]
    fn long_fields_get_multi_byte_lengths() {
        for size in [126, 127, 128, 129, 16_383, 16_384, 70_000] {
            let value = "x".repeat(size);
            let answer = ok([("x-big", value.as_str())], &[]);
            let response = decode(&answer);
            let Some(HttpResponse::OkResponse(ok)) = response.http_response else {
                panic!("not an OkHttpResponse");
            };
            assert_eq!(ok.headers[0].header.clone().unwrap().value, value, "{size}");
        }
    }
}
