//! The messages of Envoy's external authorization gRPC service,
//! `envoy.service.auth.v3.Authorization/Check`, as prost messages whose field numbers and types
//! are those of Envoy's API (Apache-2.0, © Envoy Project Authors):
//! `envoy/service/auth/v3/external_auth.proto` (CheckRequest, CheckResponse,
//! DeniedHttpResponse, OkHttpResponse), `envoy/service/auth/v3/attribute_context.proto`
//! (AttributeContext and its Peer, Request, HttpRequest, TLSSession),
//! `envoy/config/core/v3/address.proto` (Address, SocketAddress),
//! `envoy/config/core/v3/base.proto` (HeaderValue, HeaderValueOption),
//! `envoy/type/v3/http_status.proto` (HttpStatus) and `google/rpc/status.proto` (Status).
//! Only the fields Outrigger fills or reads are declared: a decoder skips the others, so the
//! wire format is the protos' own. Public so that tests (and their authorizers) can use them.

/// The gRPC method an `envoyExtAuthzGrpc` provider serves.
pub const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckRequest {
    #[prost(message, optional, tag = "1")]
    pub attributes: Option<AttributeContext>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AttributeContext {
    #[prost(message, optional, tag = "1")]
    pub source: Option<Peer>,
    #[prost(message, optional, tag = "2")]
    pub destination: Option<Peer>,
    #[prost(message, optional, tag = "4")]
    pub request: Option<Request>,
    #[prost(map = "string, string", tag = "10")]
    pub context_extensions: std::collections::HashMap<String, String>,
    #[prost(message, optional, tag = "12")]
    pub tls_session: Option<TlsSession>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Peer {
    #[prost(message, optional, tag = "1")]
    pub address: Option<Address>,
    #[prost(string, tag = "2")]
    pub service: String,
    #[prost(map = "string, string", tag = "3")]
    pub labels: std::collections::HashMap<String, String>,
    #[prost(string, tag = "4")]
    pub principal: String,
    #[prost(string, tag = "5")]
    pub certificate: String,
}

/// `config.core.v3.Address` with its `socket_address` (field 1 of the `address` oneof).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Address {
    #[prost(message, optional, tag = "1")]
    pub socket_address: Option<SocketAddress>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SocketAddress {
    /// `TCP` is 0.
    #[prost(int32, tag = "1")]
    pub protocol: i32,
    #[prost(string, tag = "2")]
    pub address: String,
    #[prost(uint32, tag = "3")]
    pub port_value: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Request {
    #[prost(message, optional, tag = "1")]
    pub time: Option<prost_types::Timestamp>,
    #[prost(message, optional, tag = "2")]
    pub http: Option<HttpRequest>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpRequest {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub method: String,
    #[prost(map = "string, string", tag = "3")]
    pub headers: std::collections::HashMap<String, String>,
    #[prost(string, tag = "4")]
    pub path: String,
    #[prost(string, tag = "5")]
    pub host: String,
    #[prost(string, tag = "6")]
    pub scheme: String,
    #[prost(string, tag = "7")]
    pub query: String,
    #[prost(string, tag = "8")]
    pub fragment: String,
    #[prost(int64, tag = "9")]
    pub size: i64,
    #[prost(string, tag = "10")]
    pub protocol: String,
    #[prost(string, tag = "11")]
    pub body: String,
    #[prost(bytes = "vec", tag = "12")]
    pub raw_body: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TlsSession {
    #[prost(string, tag = "1")]
    pub sni: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<RpcStatus>,
    /// `http_response` oneof: field 2.
    #[prost(message, optional, tag = "2")]
    pub denied_response: Option<DeniedHttpResponse>,
    /// `http_response` oneof: field 3.
    #[prost(message, optional, tag = "3")]
    pub ok_response: Option<OkHttpResponse>,
}

/// `google.rpc.Status`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DeniedHttpResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<HttpStatus>,
    #[prost(message, repeated, tag = "2")]
    pub headers: Vec<HeaderValueOption>,
    #[prost(string, tag = "3")]
    pub body: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct OkHttpResponse {
    #[prost(message, repeated, tag = "2")]
    pub headers: Vec<HeaderValueOption>,
    #[prost(string, repeated, tag = "5")]
    pub headers_to_remove: Vec<String>,
    #[prost(message, repeated, tag = "6")]
    pub response_headers_to_add: Vec<HeaderValueOption>,
}

/// `type.v3.HttpStatus`: `code` is the `StatusCode` enum, whose values are the HTTP codes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderValueOption {
    #[prost(message, optional, tag = "1")]
    pub header: Option<HeaderValue>,
    /// `google.protobuf.BoolValue append = 2` (deprecated for `append_action`).
    #[prost(message, optional, tag = "2")]
    pub append: Option<bool>,
    /// `HeaderAppendAction`: `APPEND_IF_EXISTS_OR_ADD` 0, `ADD_IF_ABSENT` 1,
    /// `OVERWRITE_IF_EXISTS_OR_ADD` 2, `OVERWRITE_IF_EXISTS` 3.
    #[prost(int32, tag = "3")]
    pub append_action: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
    #[prost(bytes = "vec", tag = "3")]
    pub raw_value: Vec<u8>,
}
