//! The one forward loop: a backend picked by the route's balancer, its in-flight slot held, one
//! exchange with it (what is sent is the caller's: a plain request, an upgrade handshake, an SSE
//! head), once more on another backend when nothing reached the first, and every outcome counted
//! once for the route and for the backend that gave it.

use std::{
    convert::Infallible,
    sync::Arc,
    time::{Duration, Instant},
};

use http::Response;

use super::{
    body::{InFlight, ResponseBody},
    error,
};
use crate::{
    backend::Backend,
    state::{Protocol, Route},
    stats::ServerStats,
    upstream::ConnectError,
};

/// What one attempt sends to a backend, and how its answer reaches the client: the part of
/// forwarding that differs between a plain request, an upgrade and a spliced SSE stream.
pub(super) trait Exchange {
    /// What is sent; it comes back with a failure that sent nothing, to go to another backend.
    type Request;
    /// A backend's answer: its response head and what comes with it.
    type Answer;
    /// Why the exchange may leave a backend it cannot use, having sent nothing, so that the
    /// caller forwards the request another way (`Infallible` when it never does).
    type Pass;
    /// What reaches the client: a response for hyper to write, or what the proxy's own engine
    /// relays; the proxy's own answers (502, 503, 504) become one.
    type Reply: From<Response<ResponseBody>>;
    /// Log messages of the loop's own outcomes for this kind of exchange.
    const NO_BACKEND: &'static str;
    const CONNECT_FAILED: &'static str;
    const TIMED_OUT: &'static str;

    /// Sends `req` to `backend` and waits for its answer. Failures after something was sent are
    /// logged here, where their cause is known.
    async fn send(
        &mut self,
        backend: &Arc<Backend>,
        req: Self::Request,
        guard: &mut InFlight,
    ) -> Result<Self::Answer, Failure<Self::Request, Self::Pass>>;

    /// The client's response to the backend's answer (taking the in-flight slot with it for as
    /// long as the response or flow lasts), and the status counted for it.
    fn answer(
        self,
        answer: Self::Answer,
        backend: &Arc<Backend>,
        guard: InFlight,
        started: Instant,
    ) -> Answered<Self::Reply>;
}

/// Why an attempt gave no answer to relay.
pub(super) enum Failure<R, P = Infallible> {
    /// Nothing reached the backend; the request comes back when it can be resent (any method is
    /// safe to resend: the backend saw nothing).
    Connect(ConnectError, Option<Box<R>>),
    /// The backend did not answer within this long: 504.
    Timeout(Duration),
    /// Failed after sending (logged where it happened): the proxy answers this (502, 413).
    Local(Response<ResponseBody>),
    /// The exchange cannot use this backend and sent nothing.
    Pass(P),
}

impl<R, P> Failure<R, P> {
    /// Nothing was sent; `req` can go to another backend.
    pub fn unsent(e: ConnectError, req: R) -> Self {
        Failure::Connect(e, Some(Box::new(req)))
    }
}

/// The client's response and the status counted for it: the backend's, or the proxy's when it
/// answers on the backend's behalf. They differ only where the response head goes out another
/// way than through hyper (a spliced SSE stream).
pub(super) struct Answered<R = Response<ResponseBody>> {
    pub response: R,
    pub status: u16,
}

impl<R: From<Response<ResponseBody>>> Answered<R> {
    /// The proxy's own answer.
    fn local(response: Response<ResponseBody>) -> Self {
        Answered { status: response.status().as_u16(), response: response.into() }
    }
}

impl From<Response<ResponseBody>> for Answered {
    fn from(response: Response<ResponseBody>) -> Self {
        Answered { status: response.status().as_u16(), response }
    }
}

/// Forwards `req` with `exchange` to a backend the route's balancer for `protocol` picks; on a
/// connect failure, once more to another one. Every answer, and every failure once a backend was
/// tried, is counted for the route and that backend; `Err` only when the exchange passed.
pub(super) async fn forward<E: Exchange>(
    route: &Route,
    protocol: Protocol,
    hash: u64,
    server: &Arc<ServerStats>,
    mut req: E::Request,
    mut exchange: E,
) -> Result<E::Reply, E::Pass> {
    let mut failed: Option<Arc<Backend>> = None;
    // Every backend tried so far only had no connection to spare (`max_conn`): no backend
    // failed, they are all busy, which is a 503 like finding none eligible.
    let mut only_busy = true;
    loop {
        let attempt = u8::from(failed.is_some());
        let Some((index, backend)) = route.pick(protocol, hash, failed.as_deref()) else {
            tracing::warn!(route = %route.name, upstream = %route.upstream.name, "{}", E::NO_BACKEND);
            return Ok(if only_busy { error::unavailable() } else { error::bad_gateway() }.into());
        };
        let mut guard = InFlight::new(backend.clone(), server.clone());
        let started = Instant::now();
        let answered = match exchange.send(&backend, req, &mut guard).await {
            Ok(answer) => exchange.answer(answer, &backend, guard, started),
            Err(Failure::Connect(e, back)) => {
                let busy = matches!(e, ConnectError::Saturated { .. });
                if !busy {
                    backend.connect_failed();
                }
                only_busy &= busy;
                tracing::warn!(route = %route.name, backend = %backend.id, attempt, error = %e,
                    "{}", E::CONNECT_FAILED);
                match back {
                    Some(back) if failed.is_none() => {
                        req = *back;
                        failed = Some(backend);
                        continue;
                    }
                    _ if only_busy => Answered::local(error::unavailable()),
                    _ => Answered::local(error::bad_gateway()),
                }
            }
            Err(Failure::Timeout(limit)) => {
                tracing::warn!(route = %route.name, backend = %backend.id, timeout = ?limit, "{}", E::TIMED_OUT);
                Answered::local(error::gateway_timeout())
            }
            Err(Failure::Local(resp)) => Answered::local(resp),
            Err(Failure::Pass(p)) => return Err(p),
        };
        route.record(index, &backend, answered.status, started.elapsed());
        return Ok(answered.response);
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, sync::atomic::Ordering::Relaxed};

    use super::*;
    use crate::{config::Config, datapath::Userspace, state::State};

    /// What one scripted attempt does.
    #[derive(Clone, Copy)]
    enum Step {
        /// Connection refused: nothing sent.
        Refused,
        /// The backend's `max_conn` connections are all busy: nothing sent, and no ill health.
        Saturated,
        Timeout,
        /// Failed after sending: the proxy answers 502.
        Broken,
        Pass,
        /// The backend answers with this status.
        Answer(u16),
    }

    /// An exchange that plays its steps in order and notes the backend of each attempt.
    struct Script<'a> {
        steps: VecDeque<Step>,
        tried: &'a mut Vec<String>,
    }

    impl Exchange for Script<'_> {
        type Request = &'static str;
        type Answer = u16;
        type Pass = ();
        type Reply = Response<ResponseBody>;
        const NO_BACKEND: &'static str = "script: no backend";
        const CONNECT_FAILED: &'static str = "script: refused";
        const TIMED_OUT: &'static str = "script: too slow";

        async fn send(
            &mut self,
            backend: &Arc<Backend>,
            req: &'static str,
            _: &mut InFlight,
        ) -> Result<u16, Failure<&'static str, ()>> {
            self.tried.push(backend.id.clone());
            let addr = backend.pool.addr();
            match self.steps.pop_front().expect("no more attempts than scripted") {
                Step::Refused => {
                    let source = std::io::ErrorKind::ConnectionRefused.into();
                    Err(Failure::unsent(ConnectError::Io { addr, source }, req))
                }
                Step::Saturated => Err(Failure::unsent(ConnectError::Saturated { addr, limit: 1 }, req)),
                Step::Timeout => Err(Failure::Timeout(Duration::from_secs(1))),
                Step::Broken => Err(Failure::Local(error::bad_gateway())),
                Step::Pass => Err(Failure::Pass(())),
                Step::Answer(status) => Ok(status),
            }
        }

        fn answer(self, status: u16, _: &Arc<Backend>, _: InFlight, _: Instant) -> Answered {
            let mut response = Response::new(ResponseBody::Local(None));
            *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
            response.into()
        }
    }

    /// One route over backends with these ids (nothing listens: the script plays the backends).
    fn state(ids: &[&str]) -> State {
        let mut yaml = "server:\n  host: 127.0.0.1\n  port: 8080\nbackends:\n  up:\n".to_owned();
        for (i, id) in ids.iter().enumerate() {
            yaml += &format!("    - id: {id}\n      host: 127.0.0.1\n      port: {}\n", i + 1);
        }
        yaml += "routing:\n  r:\n    path: /\n    upstream: up\n    load_balancer: round_robin\n";
        State::new(Config::parse(&yaml).unwrap(), Arc::new(Userspace)).unwrap()
    }

    /// What a run left: the status (None: passed), the backends tried, and for each backend what
    /// was counted.
    #[derive(Debug, PartialEq)]
    struct Outcome {
        status: Option<u16>,
        tried: Vec<String>,
        counted: Vec<Counted>,
    }

    /// A backend's requests counted, the route's requests to it by code, and whether it is up.
    #[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
    struct Counted {
        id: String,
        requests: u64,
        codes: Vec<(u16, u64)>,
        up: bool,
    }

    async fn run(state: &State, steps: &[Step]) -> Outcome {
        let snap = state.snapshot();
        let route = &snap.routes[0];
        let mut tried = Vec::new();
        let script = Script { steps: steps.iter().copied().collect(), tried: &mut tried };
        let result = forward(route, Protocol::Http, 0, &state.stats, "GET /", script).await;
        let backends = &route.upstream.backends;
        assert!(backends.iter().all(|b| b.inflight.load(Relaxed) == 0), "an in-flight slot was kept");
        let counted = backends
            .iter()
            .zip(&route.stats)
            .map(|(b, rs)| Counted {
                id: b.id.clone(),
                requests: b.traffic.requests.load(Relaxed),
                codes: rs.codes().collect(),
                up: b.is_up(),
            })
            .collect();
        Outcome { status: result.ok().map(|r| r.status().as_u16()), tried, counted }
    }

    fn row(id: &str, codes: &[(u16, u64)], up: bool) -> Counted {
        Counted { id: id.to_owned(), requests: codes.iter().map(|c| c.1).sum(), codes: codes.to_vec(), up }
    }

    #[tokio::test]
    async fn every_outcome_of_one_attempt_is_counted_once() {
        for (step, status) in
            [(Step::Answer(101), 101), (Step::Answer(404), 404), (Step::Timeout, 504), (Step::Broken, 502)]
        {
            let s = state(&["a"]);
            let want = Outcome {
                status: Some(status),
                tried: vec!["a".into()],
                counted: vec![row("a", &[(status, 1)], true)],
            };
            assert_eq!(run(&s, &[step]).await, want);
        }
    }

    #[tokio::test]
    async fn a_connect_failure_goes_to_another_backend_and_only_the_answer_counts() {
        let s = state(&["a", "b"]);
        let out = run(&s, &[Step::Refused, Step::Answer(200)]).await;
        let (first, second) = (out.tried[0].as_str(), out.tried[1].as_str());
        assert_ne!(first, second);
        let mut want = vec![row(first, &[], false), row(second, &[(200, 1)], true)];
        want.sort();
        assert_eq!(out, Outcome { status: Some(200), tried: out.tried.clone(), counted: want });
    }

    #[tokio::test]
    async fn two_connect_failures_are_one_502_counted_for_the_second_backend() {
        let s = state(&["a", "b"]);
        let out = run(&s, &[Step::Refused, Step::Refused]).await;
        let second = out.tried[1].as_str();
        let mut want = vec![row(&out.tried[0], &[], false), row(second, &[(502, 1)], false)];
        want.sort();
        assert_eq!(out, Outcome { status: Some(502), tried: out.tried.clone(), counted: want });
    }

    #[tokio::test]
    async fn nothing_left_to_try_is_502_after_a_failure_and_503_before_any() {
        let s = state(&["a"]);
        let want = Outcome { status: Some(502), tried: vec!["a".into()], counted: vec![row("a", &[], false)] };
        assert_eq!(run(&s, &[Step::Refused]).await, want);
        // `a` sits out its cool-down now.
        let want = Outcome { status: Some(503), tried: vec![], counted: vec![row("a", &[], false)] };
        assert_eq!(run(&s, &[]).await, want);
    }

    #[tokio::test]
    async fn a_saturated_backend_is_skipped_without_counting_it_as_failed() {
        let s = state(&["a", "b"]);
        let out = run(&s, &[Step::Saturated, Step::Answer(200)]).await;
        let mut want = vec![row(&out.tried[0], &[], true), row(&out.tried[1], &[(200, 1)], true)];
        want.sort();
        assert_eq!(out, Outcome { status: Some(200), tried: out.tried.clone(), counted: want });
    }

    #[tokio::test]
    async fn busy_backends_only_are_503_not_502() {
        let s = state(&["a"]);
        let want = Outcome { status: Some(503), tried: vec!["a".into()], counted: vec![row("a", &[], true)] };
        assert_eq!(run(&s, &[Step::Saturated]).await, want);
        let s = state(&["a", "b"]);
        let out = run(&s, &[Step::Saturated, Step::Saturated]).await;
        assert_eq!(out.status, Some(503), "{out:?}");
        let out = run(&s, &[Step::Saturated, Step::Refused]).await;
        assert_eq!(out.status, Some(502), "one backend failed: {out:?}");
    }

    #[tokio::test]
    async fn a_pass_counts_nothing() {
        let s = state(&["a"]);
        let want = Outcome { status: None, tried: vec!["a".into()], counted: vec![row("a", &[], true)] };
        assert_eq!(run(&s, &[Step::Pass]).await, want);
    }
}
