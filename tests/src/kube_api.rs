//! A fake Kubernetes API server for the pod watch: plain HTTP/1.1 on a
//! local port, serving `GET /api/v1/pods` lists (a `PodList` with its
//! `resourceVersion`) and watches (`?watch=true&resourceVersion=N`, JSON
//! lines of `ADDED`/`MODIFIED`/`DELETED` events in a chunked response that
//! stays open), as the real API server does. The test adds, modifies and
//! deletes pods, and can take the server down (500s, open watches cut)
//! and bring it back.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde_json::Value;

#[derive(Default)]
struct State {
    up: bool,
    /// Current pods, by uid.
    pods: Vec<(String, Value)>,
    /// Every event so far: (resource version, JSON line).
    events: Vec<(u64, String)>,
    resource_version: u64,
    /// Bumped when the server goes down, which ends open watches.
    epoch: u64,
    /// Request lines received (`GET /api/v1/pods?…`).
    requests: Vec<String>,
    stopped: bool,
}

/// The fake API server; stops when dropped.
pub struct FakeApi {
    addr: SocketAddr,
    state: Arc<(Mutex<State>, Condvar)>,
}

impl FakeApi {
    /// Starts serving; `up` says whether it answers or fails with 500s.
    pub fn start(up: bool) -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fake API");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new((
            Mutex::new(State {
                up,
                resource_version: 1000,
                ..State::default()
            }),
            Condvar::new(),
        ));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if shared.0.lock().unwrap().stopped {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &shared);
                });
            }
        });
        FakeApi { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Up: answer. Down: 500 for every request, and open watches are cut.
    pub fn set_up(&self, up: bool) {
        let (lock, cv) = &*self.state;
        let mut s = lock.lock().unwrap();
        if s.up && !up {
            s.epoch += 1;
        }
        s.up = up;
        cv.notify_all();
    }

    /// The request lines seen so far.
    pub fn requests(&self) -> Vec<String> {
        self.state.0.lock().unwrap().requests.clone()
    }

    /// Adds or replaces a pod (by uid) and emits ADDED or MODIFIED.
    pub fn apply(&self, pod: &Value) {
        let uid = pod["metadata"]["uid"]
            .as_str()
            .expect("pod uid")
            .to_string();
        let (lock, cv) = &*self.state;
        let mut s = lock.lock().unwrap();
        s.resource_version += 1;
        let mut pod = pod.clone();
        pod["metadata"]["resourceVersion"] = Value::String(s.resource_version.to_string());
        let kind = if s.pods.iter().any(|(u, _)| *u == uid) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.pods.retain(|(u, _)| *u != uid);
        s.pods.push((uid, pod.clone()));
        let line = serde_json::json!({"type": kind, "object": pod}).to_string();
        let rv = s.resource_version;
        s.events.push((rv, line));
        cv.notify_all();
    }

    /// Deletes a pod (by uid) and emits DELETED.
    pub fn delete(&self, uid: &str) {
        let (lock, cv) = &*self.state;
        let mut s = lock.lock().unwrap();
        let Some(pos) = s.pods.iter().position(|(u, _)| u == uid) else {
            panic!("no pod {uid} to delete");
        };
        let (_, mut pod) = s.pods.remove(pos);
        s.resource_version += 1;
        pod["metadata"]["resourceVersion"] = Value::String(s.resource_version.to_string());
        let line = serde_json::json!({"type": "DELETED", "object": pod}).to_string();
        let rv = s.resource_version;
        s.events.push((rv, line));
        cv.notify_all();
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        let (lock, cv) = &*self.state;
        let mut s = lock.lock().unwrap();
        s.stopped = true;
        s.epoch += 1;
        cv.notify_all();
        drop(s);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(stream: TcpStream, shared: &Arc<(Mutex<State>, Condvar)>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        // Headers (the client sends no body with GET).
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 || header == "\r\n" || header == "\n" {
                break;
            }
        }
        let target = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("")
            .to_string();
        let (lock, cv) = &**shared;
        let mut s = lock.lock().unwrap();
        s.requests.push(target.clone());
        if !s.up {
            drop(s);
            let body = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"etcdserver: leader changed","reason":"InternalError","code":500}"#;
            write!(
                out,
                "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )?;
            return Ok(());
        }
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        if path != "/api/v1/pods" {
            drop(s);
            let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#;
            write!(
                out,
                "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )?;
            continue;
        }
        let param = |name: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .map(str::to_string)
        };
        let watch = matches!(param("watch").as_deref(), Some("true" | "1"));
        if !watch {
            let items: Vec<Value> = s.pods.iter().map(|(_, p)| p.clone()).collect();
            let body = serde_json::json!({
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": s.resource_version.to_string()},
                "items": items,
            })
            .to_string();
            drop(s);
            write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )?;
            continue;
        }
        // A watch: every event after the requested version, then new ones
        // as they come, until the server goes down or the client leaves.
        let mut since: u64 = param("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let epoch = s.epoch;
        drop(s);
        out.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        )?;
        out.flush()?;
        loop {
            let s = lock.lock().unwrap();
            let s = cv
                .wait_timeout_while(s, Duration::from_millis(500), |s| {
                    s.epoch == epoch && s.events.last().is_none_or(|(rv, _)| *rv <= since)
                })
                .unwrap()
                .0;
            if s.epoch != epoch {
                // Cut without the final chunk, as a dropped connection.
                return Ok(());
            }
            let pending: Vec<(u64, String)> = s
                .events
                .iter()
                .filter(|(rv, _)| *rv > since)
                .cloned()
                .collect();
            drop(s);
            for (rv, line) in pending {
                let chunk = format!("{line}\n");
                write!(out, "{:x}\r\n{chunk}\r\n", chunk.len())?;
                since = rv;
            }
            out.flush()?;
        }
    }
}
