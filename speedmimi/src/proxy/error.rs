//! The proxy's own answers: short bodies with the status a client can act on.

use http::{Response, StatusCode, header};

use super::body::ResponseBody;

pub fn response(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::local(text));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

pub fn bad_request(text: &'static str) -> Response<ResponseBody> {
    refused(StatusCode::BAD_REQUEST, text)
}

/// A refused request whose body (if any) is left unread: the connection closes after it.
pub fn refused(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut r = response(status, text);
    r.headers_mut().insert(header::CONNECTION, http::HeaderValue::from_static("close"));
    r
}

/// Closes the connection: the body left unread must not be taken for the next request.
pub fn payload_too_large() -> Response<ResponseBody> {
    refused(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n")
}

pub fn no_route() -> Response<ResponseBody> {
    response(StatusCode::NOT_FOUND, "no route for this request\n")
}

pub fn unavailable() -> Response<ResponseBody> {
    response(StatusCode::SERVICE_UNAVAILABLE, "no backend available\n")
}

pub fn bad_gateway() -> Response<ResponseBody> {
    response(StatusCode::BAD_GATEWAY, "upstream failed\n")
}

pub fn gateway_timeout() -> Response<ResponseBody> {
    response(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n")
}
