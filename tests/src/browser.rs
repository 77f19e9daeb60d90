//! A real browser for the console tests: Debian's headless Chromium driven through its
//! chromedriver (started here on a free port, in a process group of its own that is killed
//! on drop) through the W3C WebDriver protocol, spoken here over the test crate's reqwest.
//!
//! Why not a WebDriver crate: fantoccini depends on Mozilla's `webdriver` crate (MPL-2.0,
//! refused by deny.toml's permissive allow-list), and thirtyfour turns on serde_json's
//! `preserve_order` for every crate of the test build (it changes the services' JSON maps
//! under test, and the fake Graph's types). The dozen commands the console tests use are a
//! JSON request each.
//!
//! Waits are on DOM conditions with a deadline ([`Browser::wait_css`], [`Browser::wait_text`]),
//! never sleeps. `.ci/run` (scripts/services.sh's `install_test_tools`) installs
//! `chromium` and `chromium-driver` when they are missing.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

/// Debian's Chromium.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian's chromedriver (package `chromium-driver`), of the same version.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long a page or an element may take to appear.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// A headless Chromium session; its chromedriver (and the browser) end with it.
pub struct Browser {
    http: reqwest::Client,
    /// `http://127.0.0.1:PORT/session/ID`.
    session: String,
    /// Kills chromedriver's process group when the browser is dropped (a panicking test too).
    _driver: DriverGuard,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session.
    pub async fn start() -> Self {
        assert!(
            Path::new(CHROMEDRIVER).exists() && Path::new(CHROMIUM).exists(),
            "the console tests need {CHROMIUM} and {CHROMEDRIVER}: apt-get install chromium \
             chromium-driver (scripts/services.sh install_test_tools does)"
        );
        let port = free_port();
        let mut cmd = std::process::Command::new(CHROMEDRIVER);
        cmd.arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group, so the drop can end chromedriver and the browsers it started.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let driver = DriverGuard(Some(cmd.spawn().expect("chromedriver starts")));
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + DEADLINE;
        // Poll for the listener with a deadline: chromedriver says nothing when it is ready.
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not listen on {port} within {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let caps = json!({
            "browserName": "chrome",
            // A confirmation dialog (console.js's data-confirm) is accepted by the next command.
            "unhandledPromptBehavior": "accept",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,900",
                         "--no-first-run", "--disable-extensions"],
            },
        });
        let http = reqwest::Client::new();
        let created = command(
            &http,
            reqwest::Method::POST,
            &format!("{url}/session"),
            Some(json!({"capabilities": {"alwaysMatch": caps}})),
        )
        .await
        .unwrap_or_else(|e| panic!("a chromedriver session: {e}"));
        let id = created["sessionId"]
            .as_str()
            .expect("a session id")
            .to_owned();
        Self {
            http,
            session: format!("{url}/session/{id}"),
            _driver: driver,
        }
    }

    /// Runs one WebDriver command of this session (`path` after `/session/ID`).
    async fn cmd(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        command(&self.http, method, &format!("{}{path}", self.session), body).await
    }

    /// Opens `url`.
    pub async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await
            .unwrap_or_else(|e| panic!("navigate to {url}: {e}"));
    }

    /// The ids of the elements matching `css` now.
    async fn find_all(&self, css: &str) -> Result<Vec<String>, String> {
        let found = self
            .cmd(
                reqwest::Method::POST,
                "/elements",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await?;
        Ok(found
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT_KEY].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The first element matching `css`, waiting for it up to [`DEADLINE`].
    pub async fn wait_css(&self, css: &str) -> String {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Ok(found) = self.find_all(css).await
                && let Some(first) = found.into_iter().next()
            {
                return first;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no element {css} within {DEADLINE:?}; page: {}",
                self.source().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The text of the first element matching `css`, if any.
    async fn text_of(&self, css: &str) -> Option<String> {
        let id = self.find_all(css).await.ok()?.into_iter().next()?;
        let text = self
            .cmd(reqwest::Method::GET, &format!("/element/{id}/text"), None)
            .await
            .ok()?;
        text.as_str().map(str::to_owned)
    }

    /// Waits until the element matching `css` contains `text`; returns its text.
    pub async fn wait_text(&self, css: &str, text: &str) -> String {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(t) = self.text_of(css).await
                && t.contains(text)
            {
                return t;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{css} did not show {text:?} within {DEADLINE:?}; page: {}",
                self.source().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether an element matches `css` now (for absences, after the page has loaded).
    pub async fn has(&self, css: &str) -> bool {
        !self.find_all(css).await.expect("find").is_empty()
    }

    /// Types `text` into the field matching `css`.
    pub async fn fill(&self, css: &str, text: &str) {
        let id = self.wait_css(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/clear"),
            Some(json!({})),
        )
        .await
        .expect("clear");
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        )
        .await
        .expect("type");
    }

    /// Clicks the element matching `css`.
    pub async fn click(&self, css: &str) {
        let id = self.wait_css(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            Some(json!({})),
        )
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Runs `script` in the page with `args`; returns its value.
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
        .unwrap_or_else(|e| panic!("script failed: {e}"))
    }

    /// The page's HTML.
    pub async fn source(&self) -> String {
        self.cmd(reqwest::Method::GET, "/source", None)
            .await
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// Writes a PNG of the window to `docs/console/NAME.png` when `UPDATE_SCREENSHOTS=1`
    /// (so the README's pictures are of the real console).
    pub async fn screenshot(&self, name: &str) {
        if std::env::var("UPDATE_SCREENSHOTS").as_deref() != Ok("1") {
            return;
        }
        let encoded = self
            .cmd(reqwest::Method::GET, "/screenshot", None)
            .await
            .expect("screenshot");
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().expect("base64 text"))
            .expect("a base64 PNG");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/console");
        std::fs::create_dir_all(&dir).expect("docs/console");
        std::fs::write(dir.join(format!("{name}.png")), png).expect("write the screenshot");
    }

    /// Ends the session (the browser quits) and chromedriver.
    pub async fn close(self) {
        let _ = self.cmd(reqwest::Method::DELETE, "", None).await;
    }
}

/// The key of an element reference in W3C WebDriver answers.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One WebDriver command: its answer's `value`, or the driver's error and message.
async fn command(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    let mut req = http.request(method, url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.map_err(|e| e.to_string())?;
    let ok = resp.status().is_success();
    let answer: Value = resp.json().await.map_err(|e| e.to_string())?;
    let value = answer.get("value").cloned().unwrap_or(Value::Null);
    if ok {
        Ok(value)
    } else {
        Err(format!("{}: {}", value["error"], value["message"]))
    }
}

/// Kills chromedriver's process group when dropped (also when a test panics).
struct DriverGuard(Option<std::process::Child>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            // The group id is chromedriver's pid (process_group(0)); `kill` reaches the
            // browsers it started too, without any unsafe code here.
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
