//! The one test HTTP server: scripted HTTP/1.1 on 127.0.0.1 for the download tests, the fake
//! registry ([`crate::oci::FakeRegistry`]) and the download benchmark. It answers each request
//! with what a handler says (a body, a status, a redirect, a dropped connection, a stall, a
//! trickle) and records every request, so tests can count them and inspect `Range` headers.
//!
//! One request per connection (`Connection: close`), one thread per connection, so a stalled
//! reply never blocks the next request.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The start of a `Range: bytes=N-` request.
    pub fn range_start(&self) -> Option<u64> {
        self.header("range")?
            .strip_prefix("bytes=")?
            .strip_suffix('-')?
            .parse()
            .ok()
    }
}

/// What to answer.
#[derive(Clone)]
pub enum Reply {
    /// `200` with the body; with `ranges`, a `Range: bytes=N-` request gets `206` and the rest.
    Body { body: Arc<Vec<u8>>, ranges: bool },
    /// `200` announcing the whole body, but the connection closes after `cut` bytes.
    Cut { body: Arc<Vec<u8>>, cut: usize },
    /// A bare status with extra headers and no body.
    Status {
        code: u16,
        headers: Vec<(String, String)>,
    },
    /// Any status with headers and a body (left out for `HEAD`), e.g. a registry's answers.
    Full {
        code: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// `302 Found` to this URL.
    Redirect(String),
    /// Read the request and never answer (until the server is dropped).
    Stall,
    /// `200` announcing the whole body (honouring `Range: bytes=N-` with `206`, like `Body`
    /// with ranges), then `chunk` bytes at a time with a pause of `every` between them: a
    /// server that never stops sending but is too slow to finish.
    Trickle {
        body: Arc<Vec<u8>>,
        chunk: usize,
        every: Duration,
    },
}

type Handler = dyn Fn(usize, &Request) -> Reply + Send + Sync;

pub struct Server {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    /// Listens on an ephemeral port of 127.0.0.1; `handler` gets the request's index (0-based,
    /// in arrival order) and the request.
    /// A server that answers every request with `body` (honouring `Range` when `ranges`).
    pub fn serving(body: &Arc<Vec<u8>>, ranges: bool) -> Server {
        let body = Arc::clone(body);
        Server::start(move |_, _| Reply::Body {
            body: Arc::clone(&body),
            ranges,
        })
        .expect("starting a loopback server")
    }

    pub fn start(
        handler: impl Fn(usize, &Request) -> Reply + Send + Sync + 'static,
    ) -> io::Result<Server> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let accept = {
            let (requests, stop) = (requests.clone(), stop.clone());
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (requests, stop, handler) =
                        (requests.clone(), stop.clone(), handler.clone());
                    thread::spawn(move || {
                        let _ = serve(stream, &requests, &stop, &*handler);
                    });
                }
            })
        };
        Ok(Server {
            addr,
            requests,
            stop,
            accept: Some(accept),
        })
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// How many requests arrived so far.
    pub fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

fn serve(
    stream: TcpStream,
    requests: &Mutex<Vec<Request>>,
    stop: &AtomicBool,
    handler: &Handler,
) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(()); // the wake-up connection from Drop
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
    }
    let request = Request {
        method,
        path,
        headers,
    };
    let index = {
        let mut all = requests.lock().unwrap();
        all.push(request.clone());
        all.len() - 1
    };
    let mut out = stream;
    match handler(index, &request) {
        Reply::Body { body, ranges } => {
            let len = body.len() as u64;
            match request.range_start().filter(|s| ranges && *s < len) {
                Some(start) => {
                    head(
                        &mut out,
                        "206 Partial Content",
                        len - start,
                        &[("Content-Range", &format!("bytes {start}-{}/{len}", len - 1))],
                    )?;
                    out.write_all(&body[start as usize..])?;
                }
                None => {
                    head(&mut out, "200 OK", len, &[])?;
                    out.write_all(&body)?;
                }
            }
        }
        Reply::Cut { body, cut } => {
            head(&mut out, "200 OK", body.len() as u64, &[])?;
            out.write_all(&body[..cut.min(body.len())])?;
            out.flush()?;
            out.shutdown(Shutdown::Both)?;
        }
        Reply::Status { code, headers } => {
            let extra: Vec<(&str, &str)> = headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            head(&mut out, &format!("{code} Status"), 0, &extra)?;
        }
        Reply::Full {
            code,
            headers,
            body,
        } => {
            let extra: Vec<(&str, &str)> = headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            head(
                &mut out,
                &format!("{code} Status"),
                body.len() as u64,
                &extra,
            )?;
            if request.method != "HEAD" {
                out.write_all(&body)?;
            }
        }
        Reply::Redirect(to) => head(&mut out, "302 Found", 0, &[("Location", &to)])?,
        Reply::Trickle { body, chunk, every } => {
            let len = body.len() as u64;
            let start = request.range_start().filter(|s| *s < len).unwrap_or(0);
            if start > 0 {
                let range = format!("bytes {start}-{}/{len}", len - 1);
                head(
                    &mut out,
                    "206 Partial Content",
                    len - start,
                    &[("Content-Range", &range)],
                )?;
            } else {
                head(&mut out, "200 OK", len, &[])?;
            }
            for piece in body[start as usize..].chunks(chunk.max(1)) {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                out.write_all(piece)?;
                out.flush()?;
                thread::sleep(every);
            }
        }
        Reply::Stall => {
            let until = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && Instant::now() < until {
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
    out.flush()
}

fn head(out: &mut TcpStream, status: &str, len: u64, extra: &[(&str, &str)]) -> io::Result<()> {
    let mut text = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {len}\r\nConnection: close\r\n\
         Accept-Ranges: bytes\r\nETag: \"fixture\"\r\n"
    );
    for (name, value) in extra {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    out.write_all(text.as_bytes())
}
