//! The one forward loop: a backend picked by the route's balancer, its in-flight slot held, one
//! exchange with it (what is sent is the caller's: a plain request, an upgrade handshake, an SSE
//! head), again on other backends when the first failed in a way that allows it (retries within
//! the upstream's budget), and every outcome counted once for the route and for the backend that
//! gave it.

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

    /// The status of a backend's answer, before it is relayed.
    fn status(&self, answer: &Self::Answer) -> u16;

    /// The request again, to send to another backend after this one broke the connection or
    /// answered with a status to retry; None when it cannot be resent (not idempotent, or its
    /// body is gone).
    fn replay(&mut self) -> Option<Self::Request>;

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
    /// The backend closed or reset the connection after the request went out and before any
    /// byte of an answer (what happened, for the log): 502, or sent again (`Exchange::replay`).
    Reset(String),
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

/// Forwards `req` with `exchange` to a backend the route's balancer for `protocol` picks. A
/// request goes to another backend (at most `retries.max` more, each not tried yet, within the
/// upstream's retry budget) when nothing reached the backend, or when the exchange can send it
/// again (an idempotent request) and the backend broke the connection before answering or
/// answered with a status of `retries.statuses`. Every answer, and every failure once a backend
/// was tried, is counted for the route and that backend; `Err` only when the exchange passed.
pub(super) async fn forward<E: Exchange>(
    route: &Route,
    protocol: Protocol,
    hash: u64,
    server: &Arc<ServerStats>,
    mut req: E::Request,
    mut exchange: E,
) -> Result<E::Reply, E::Pass> {
    let upstream = &route.upstream;
    let retries = &upstream.conf.retries;
    upstream.budget.deposit();
    // Backends this request tried and left; allocated only on a retry.
    let mut tried: Vec<Arc<Backend>> = Vec::new();
    // Every backend tried so far only had no connection to spare (`max_conn`): no backend
    // failed, they are all busy, which is a 503 like finding none eligible.
    let mut only_busy = true;
    let mut next = route.pick(protocol, hash, &[]);
    loop {
        let attempt = tried.len();
        let Some((index, backend)) = next.take() else {
            tracing::warn!(route = %route.name, upstream = %upstream.name, "{}", E::NO_BACKEND);
            return Ok(if only_busy { error::unavailable() } else { error::bad_gateway() }.into());
        };
        // Another backend for this request, when it may have one; `free` when `backend` was only
        // full (nothing failed), which takes nothing from the retry budget.
        let another = |tried: &mut Vec<Arc<Backend>>, backend: &Arc<Backend>, free: bool| {
            if tried.len() >= retries.max as usize {
                return None;
            }
            tried.push(backend.clone());
            let other = route.pick(protocol, hash, tried)?;
            (free || upstream.budget.withdraw()).then_some(other)
        };
        let mut guard = InFlight::new(backend.clone(), server.clone());
        let started = Instant::now();
        backend.latency.begin(started);
        let sent = exchange.send(&backend, req, &mut guard).await;
        backend.latency.end(Instant::now());
        let answered = match sent {
            Ok(answer) => {
                let status = exchange.status(&answer);
                if retries.statuses.contains(&status)
                    && let Some(again) = exchange.replay()
                    && let Some(other) = another(&mut tried, &backend, false)
                {
                    tracing::info!(route = %route.name, backend = %backend.id, status, attempt,
                        "retrying on another backend after the backend's answer");
                    drop(answer);
                    route.record(index, &backend, status, started.elapsed());
                    (req, next) = (again, Some(other));
                    continue;
                }
                exchange.answer(answer, &backend, guard, started)
            }
            Err(Failure::Connect(e, back)) => {
                let busy = matches!(e, ConnectError::Saturated { .. });
                if !busy {
                    backend.connect_failed();
                }
                only_busy &= busy;
                tracing::warn!(route = %route.name, backend = %backend.id, attempt, error = %e,
                    "{}", E::CONNECT_FAILED);
                if let Some(back) = back
                    && let Some(other) = another(&mut tried, &backend, busy)
                {
                    if !busy {
                        upstream.failed(&backend);
                    }
                    (req, next) = (*back, Some(other));
                    continue;
                }
                if busy {
                    // Full, not failed: nothing to count against the backend.
                    return Ok(if only_busy { error::unavailable() } else { error::bad_gateway() }.into());
                }
                Answered::local(if only_busy { error::unavailable() } else { error::bad_gateway() })
            }
            Err(Failure::Reset(why)) => {
                tracing::warn!(route = %route.name, backend = %backend.id, attempt, error = %why,
                    "upstream closed or reset the connection before answering");
                only_busy = false;
                if let Some(again) = exchange.replay()
                    && let Some(other) = another(&mut tried, &backend, false)
                {
                    upstream.failed(&backend);
                    (req, next) = (again, Some(other));
                    continue;
                }
                Answered::local(error::bad_gateway())
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
        /// Closed before any byte of an answer.
        Reset,
        Pass,
        /// The backend answers with this status.
        Answer(u16),
    }

    /// An exchange that plays its steps in order and notes the backend of each attempt.
    struct Script<'a> {
        steps: VecDeque<Step>,
        tried: &'a mut Vec<String>,
        /// The request may be sent again (idempotent).
        replayable: bool,
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
                Step::Reset => Err(Failure::Reset("reset by peer".into())),
                Step::Pass => Err(Failure::Pass(())),
                Step::Answer(status) => Ok(status),
            }
        }

        fn status(&self, status: &u16) -> u16 {
            *status
        }

        fn replay(&mut self) -> Option<&'static str> {
            self.replayable.then_some("GET /")
        }

        fn answer(self, status: u16, _: &Arc<Backend>, _: InFlight, _: Instant) -> Answered {
            let mut response = Response::new(ResponseBody::Local(None));
            *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
            response.into()
        }
    }

    /// One route over backends with these ids (nothing listens: the script plays the backends).
    fn state(ids: &[&str]) -> State {
        state_with(ids, "")
    }

    /// The same, with `upstreams.up` set to `upstream` (YAML lines indented by four).
    fn state_with(ids: &[&str], upstream: &str) -> State {
        let mut yaml =
            format!("server:\n  host: 127.0.0.1\n  port: 8080\nupstreams:\n  up:\n{upstream}    slow_start: 0s\n");
        yaml += "backends:\n  up:\n";
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
        run_with(state, steps, true).await
    }

    async fn run_with(state: &State, steps: &[Step], replayable: bool) -> Outcome {
        let snap = state.snapshot();
        let route = &snap.routes[0];
        let mut tried = Vec::new();
        let script = Script { steps: steps.iter().copied().collect(), tried: &mut tried, replayable };
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
        let want = Outcome { status: Some(502), tried: vec!["a".into()], counted: vec![row("a", &[(502, 1)], false)] };
        assert_eq!(run(&s, &[Step::Refused]).await, want);
        // `a` sits out its cool-down now.
        let want = Outcome { status: Some(503), tried: vec![], counted: vec![row("a", &[(502, 1)], false)] };
        assert_eq!(run(&s, &[]).await, want);
    }

    #[tokio::test]
    async fn a_saturated_backend_is_skipped_without_counting_it_as_failed() {
        let s = state(&["a", "b"]);
        let out = run(&s, &[Step::Saturated, Step::Answer(200)]).await;
        let mut want = vec![row(&out.tried[0], &[], true), row(&out.tried[1], &[(200, 1)], true)];
        want.sort();
        assert_eq!(out, Outcome { status: Some(200), tried: out.tried.clone(), counted: want });
        let budget = &s.snapshot().routes[0].upstream.budget;
        assert_eq!(budget.retried.load(Relaxed), 0, "going past a full backend is no retry");
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

    #[tokio::test]
    async fn an_answer_to_retry_goes_to_other_backends_and_each_answer_counts() {
        let s = state(&["a", "b", "c"]);
        let out = run(&s, &[Step::Answer(503), Step::Answer(502), Step::Answer(200)]).await;
        assert_eq!(out.status, Some(200));
        let mut ids = out.tried.clone();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 3, "three different backends: {out:?}");
        let codes: Vec<_> = out.counted.iter().flat_map(|c| c.codes.clone()).collect();
        assert_eq!(codes.iter().map(|c| c.1).sum::<u64>(), 3, "each answer counted once: {codes:?}");
        // Out of retries (two): the last answer goes to the client.
        let s = state(&["a", "b", "c", "d"]);
        let out = run(&s, &[Step::Answer(503), Step::Answer(503), Step::Answer(503)]).await;
        assert_eq!((out.status, out.tried.len()), (Some(503), 3));
        // Out of backends: the answer goes to the client.
        let s = state(&["a"]);
        assert_eq!(run(&s, &[Step::Answer(503)]).await.status, Some(503));
    }

    #[tokio::test]
    async fn a_request_that_cannot_be_sent_again_is_not_retried() {
        let s = state(&["a", "b"]);
        let out = run_with(&s, &[Step::Answer(503)], false).await;
        assert_eq!((out.status, out.tried.len()), (Some(503), 1));
        let out = run_with(&s, &[Step::Reset], false).await;
        assert_eq!((out.status, out.tried.len()), (Some(502), 1));
        // A reset before any answer of a request that can be sent again: another backend.
        let out = run(&s, &[Step::Reset, Step::Answer(200)]).await;
        assert_eq!((out.status, out.tried.len()), (Some(200), 2));
        // Statuses not listed are the client's.
        let out = run(&s, &[Step::Answer(500)]).await;
        assert_eq!((out.status, out.tried.len()), (Some(500), 1));
    }

    #[tokio::test]
    async fn the_budget_caps_retries() {
        // 1 retry per second of floor, no share: 10 retries in the 10-second window, then none.
        let s = state_with(
            &["a", "b"],
            "    retries: { budget_percent: 0, min_per_second: 1 }\n    outlier_ejection: { consecutive_failures: 0 }\n",
        );
        let mut retried = 0;
        for _ in 0..15 {
            let out = run(&s, &[Step::Answer(503), Step::Answer(200)]).await;
            retried += usize::from(out.tried.len() == 2);
        }
        let budget = &s.snapshot().routes[0].upstream.budget;
        assert_eq!(retried, 10);
        assert_eq!((budget.retried.load(Relaxed), budget.refused.load(Relaxed)), (10, 5));
    }

    #[tokio::test]
    async fn failures_in_a_row_eject_a_backend_until_its_time_is_up() {
        let s = state_with(&["a", "b"], "    outlier_ejection: { consecutive_failures: 2 }\n    retries: { max: 0 }\n");
        for _ in 0..4 {
            run(&s, &[Step::Answer(500)]).await;
        }
        let snap = s.snapshot();
        let ejected: Vec<bool> = snap.routes[0].upstream.backends.iter().map(|b| b.standing.ejected()).collect();
        assert_eq!(ejected.iter().filter(|&&e| e).count(), 1, "at most 50% of two: {ejected:?}");
        // Only the other backend is picked now.
        let other = snap.routes[0].upstream.backends.iter().find(|b| !b.standing.ejected()).unwrap().id.clone();
        for _ in 0..4 {
            assert_eq!(run(&s, &[Step::Answer(200)]).await.tried, vec![other.clone()]);
        }
    }
}
