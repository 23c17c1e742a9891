//! One librdkafka admin request the Rust client does not wrap (or wraps without the part this
//! product needs), made directly: the request's queue and options, the wait for its answer,
//! and ownership of every librdkafka object on every path.

use std::ffi::CStr;
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::client::Client;
use rdkafka::ClientContext;

/// Sends one admin request of kind `op` on `client`'s connections with `send` (given the
/// client's handle, the request's options and the queue its answer comes to) and waits at
/// most `within` (plus a second for the hand-over) for the answer: the result event, once its
/// request-level error is checked. Blocking.
///
/// `send` must only call the librdkafka function that makes the request, with these three.
pub fn request<C: ClientContext>(
    client: &Client<C>,
    op: rd::rd_kafka_admin_op_t,
    within: Duration,
    send: impl FnOnce(*mut rd::rd_kafka_t, *mut rd::rd_kafka_AdminOptions_t, *mut rd::rd_kafka_queue_t),
) -> Result<Owned<rd::rd_kafka_event_t>, String> {
    let timeout_ms = i32::try_from(within.as_millis()).unwrap_or(i32::MAX);
    let rk = client.native_ptr();
    // SAFETY: `rk` is alive for the call (`client` is borrowed). The queue and options are
    // destroyed by `Owned` on every path, after the answer (or its absence) is in; the event
    // goes to the caller, who reads it before it drops.
    #[allow(unsafe_code)]
    unsafe {
        let queue = Owned(rd::rd_kafka_queue_new(rk), rd::rd_kafka_queue_destroy);
        let options = Owned(
            rd::rd_kafka_AdminOptions_new(rk, op),
            rd::rd_kafka_AdminOptions_destroy,
        );
        let mut err = [0 as std::ffi::c_char; 256];
        if rd::rd_kafka_AdminOptions_set_request_timeout(
            options.0,
            timeout_ms,
            err.as_mut_ptr(),
            err.len(),
        ) != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        {
            // Without its timeout the request would wait librdkafka's default (`socket.timeout.ms`)
            // while the poll below gives up sooner: refuse it instead.
            return Err(format!(
                "request timeout {within:?} refused: {}",
                text(err.as_ptr())
            ));
        }
        send(rk, options.0, queue.0);
        // The answer, or librdkafka's own timeout error, comes within the request timeout;
        // the extra second only covers the hand-over.
        let event = Owned(
            rd::rd_kafka_queue_poll(queue.0, timeout_ms.saturating_add(1_000)),
            rd::rd_kafka_event_destroy,
        );
        if event.0.is_null() {
            return Err(format!("no answer within {within:?}"));
        }
        if rd::rd_kafka_event_error(event.0) != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        {
            return Err(text(rd::rd_kafka_event_error_string(event.0)));
        }
        Ok(event)
    }
}

/// A librdkafka object destroyed with its destructor when dropped (null: nothing to destroy).
pub struct Owned<T>(pub *mut T, pub unsafe extern "C" fn(*mut T));

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: created by the matching librdkafka constructor and destroyed once, here.
            #[allow(unsafe_code)]
            unsafe {
                (self.1)(self.0)
            }
        }
    }
}

/// A C string librdkafka owns, copied (empty when null).
///
/// # Safety
/// `s` is null or a NUL-terminated string alive for the call.
#[allow(unsafe_code)]
pub unsafe fn text(s: *const std::ffi::c_char) -> String {
    if s.is_null() {
        return String::new();
    }
    // SAFETY: the caller's promise; this copies it at once.
    unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
}
