//! A real browser for the console tests: Debian's headless Chromium driven through its
//! chromedriver (started here on a free port, in a process group of its own that is killed
//! on drop) by the `thirtyfour` WebDriver client.
//!
//! Waits are on DOM conditions with a deadline ([`Browser::wait_css`], [`Browser::wait_text`]),
//! never sleeps. `.ci/run` (scripts/services.sh's `install_test_tools`) installs
//! `chromium` and `chromium-driver` when they are missing.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use thirtyfour::prelude::{By, ElementQueryable, WebDriver, WebElement};

/// Debian's Chromium.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian's chromedriver (package `chromium-driver`), of the same version.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long a page or an element may take to appear.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// A headless Chromium session; its chromedriver (and the browser) end with it.
pub struct Browser {
    /// The WebDriver session.
    pub client: WebDriver,
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
        let caps = match caps {
            serde_json::Value::Object(m) => m,
            _ => unreachable!("an object"),
        };
        let client = WebDriver::new(url, caps)
            .await
            .expect("a chromedriver session");
        Self {
            client,
            _driver: driver,
        }
    }

    /// Opens `url`.
    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("navigates");
    }

    /// The element matching `css`, waiting for it up to [`DEADLINE`].
    pub async fn wait_css(&self, css: &str) -> WebElement {
        self.client
            .query(By::Css(css))
            .wait(DEADLINE, Duration::from_millis(50))
            .first()
            .await
            .unwrap_or_else(|e| panic!("no element {css} within {DEADLINE:?}: {e}"))
    }

    /// Waits until the element matching `css` contains `text`; returns its text.
    pub async fn wait_text(&self, css: &str, text: &str) -> String {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Ok(e) = self.client.find(By::Css(css)).await
                && let Ok(t) = e.text().await
                && t.contains(text)
            {
                return t;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{css} did not show {text:?} within {DEADLINE:?}; page: {}",
                self.client.source().await.unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether an element matches `css` now (for absences, after the page has loaded).
    pub async fn has(&self, css: &str) -> bool {
        !self
            .client
            .find_all(By::Css(css))
            .await
            .expect("find")
            .is_empty()
    }

    /// Types `text` into the field matching `css`.
    pub async fn fill(&self, css: &str, text: &str) {
        let field = self.wait_css(css).await;
        field.clear().await.expect("clear");
        field.send_keys(text).await.expect("type");
    }

    /// Clicks the element matching `css`.
    pub async fn click(&self, css: &str) {
        self.wait_css(css).await.click().await.expect("click");
    }

    /// The page's HTML.
    pub async fn source(&self) -> String {
        self.client.source().await.expect("source")
    }

    /// Writes a PNG of the window to `docs/console/NAME.png` when `UPDATE_SCREENSHOTS=1`
    /// (so the README's pictures are of the real console).
    pub async fn screenshot(&self, name: &str) {
        if std::env::var("UPDATE_SCREENSHOTS").as_deref() != Ok("1") {
            return;
        }
        let png = self.client.screenshot_as_png().await.expect("screenshot");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/console");
        std::fs::create_dir_all(&dir).expect("docs/console");
        std::fs::write(dir.join(format!("{name}.png")), png).expect("write the screenshot");
    }

    /// Ends the session (the browser quits) and chromedriver.
    pub async fn close(self) {
        let _ = self.client.clone().quit().await;
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
