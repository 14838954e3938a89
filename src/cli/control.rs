//! `vmexportfs rate`, `status` and `top`: clients of a running mount's
//! control socket.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use crate::control::describe_limit;
use crate::control::socket::{Client, Request, Response};
use crate::control::status::Status;
use crate::size::parse_size;
use crate::throttle::Limit;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

/// `RATE`, `RATE:BURST` or `off` (also `0`, `unlimited`).
pub fn parse_limit(text: &str) -> anyhow::Result<Option<Limit>> {
    let text = text.trim();
    if matches!(text, "off" | "0" | "unlimited") {
        return Ok(None);
    }
    let (rate, burst) = match text.split_once(':') {
        Some((rate, burst)) => (rate, Some(burst)),
        None => (text, None),
    };
    let rate = parse_size(rate).map_err(|err| anyhow!("rate: {err}"))?;
    if rate == 0 {
        return Ok(None);
    }
    let limit = match burst {
        None | Some("auto") => Limit::auto(rate),
        Some(burst) => Limit {
            rate,
            burst: parse_size(burst).map_err(|err| anyhow!("burst: {err}"))?,
        },
    };
    // The mount checks it again; refusing here says so before connecting.
    limit.check()?;
    Ok(Some(limit))
}

async fn status_of(client: &mut Client) -> anyhow::Result<Status> {
    match client.request(&Request::Status).await? {
        Response::Status(status) => Ok(*status),
        other => bail!("unexpected answer from the mount: {other:?}"),
    }
}

/// `vmexportfs refresh MOUNTPOINT [PATH]`: lists the source again and
/// prints what changed.
pub fn refresh(target: &Path, path: Option<&Path>) -> anyhow::Result<()> {
    let inside = match path {
        None => "/".to_string(),
        Some(path) if path.is_absolute() => match path.strip_prefix(target) {
            Ok(rest) => format!("/{}", rest.display()),
            Err(_) => bail!(
                "{} is not inside the mount {}: give a directory of it, absolute or relative to the mountpoint",
                path.display(),
                target.display()
            ),
        },
        Some(path) => format!("/{}", path.display()),
    };
    runtime()?.block_on(async {
        let mut client = Client::connect(target).await?;
        match client.request(&Request::Refresh { path: inside }).await? {
            Response::Refreshed { changes } => {
                println!(
                    "listed again: {} disk(s) added, {} removed, {} changed",
                    changes.added, changes.removed, changes.changed
                );
                Ok(())
            }
            other => bail!("unexpected answer from the mount: {other:?}"),
        }
    })
}

pub fn rate(target: &Path, limit: Option<&str>) -> anyhow::Result<()> {
    let limit = limit.map(parse_limit).transpose()?;
    runtime()?.block_on(async {
        let mut client = Client::connect(target).await?;
        match limit {
            None => {
                let status = status_of(&mut client).await?;
                println!(
                    "{}: {} ({})",
                    status.mountpoint,
                    describe_limit(status.limit),
                    status.limit_origin
                );
            }
            Some(limit) => match client.request(&Request::SetRate { limit }).await? {
                Response::Rate { limit, origin } => {
                    println!("limit now {} ({origin})", describe_limit(limit))
                }
                other => bail!("unexpected answer from the mount: {other:?}"),
            },
        }
        Ok(())
    })
}

pub fn status(target: &Path, json: bool) -> anyhow::Result<()> {
    let status = runtime()?.block_on(async {
        let mut client = Client::connect(target).await?;
        status_of(&mut client).await
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status.render());
    }
    Ok(())
}

/// Redraws the status every second until q, Esc or Ctrl-C (or the mount
/// goes away). Without a terminal it prints one frame a second instead.
pub fn top(target: &Path) -> anyhow::Result<()> {
    let runtime = runtime()?;
    let mut client = runtime.block_on(Client::connect(target))?;
    if !std::io::stdout().is_terminal() {
        loop {
            let status = runtime.block_on(status_of(&mut client))?;
            println!("{}", status.render());
            std::io::stdout().flush()?;
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let _screen = Screen::enter()?;
    loop {
        let frame = match runtime.block_on(status_of(&mut client)) {
            Ok(status) => status.render(),
            Err(err) => {
                drop(_screen);
                return Err(err.context("the mount stopped answering"));
            }
        };
        draw(&frame)?;
        let next = Instant::now() + Duration::from_secs(1);
        while let Some(left) = next.checked_duration_since(Instant::now()) {
            if crossterm::event::poll(left)? && quits(crossterm::event::read()?) {
                return Ok(());
            }
        }
    }
}

fn quits(event: crossterm::event::Event) -> bool {
    use crossterm::event::{Event, KeyCode, KeyEvent, KeyModifiers};
    match event {
        Event::Key(KeyEvent {
            code, modifiers, ..
        }) => {
            matches!(code, KeyCode::Char('q') | KeyCode::Char('Q') | KeyCode::Esc)
                || (code == KeyCode::Char('c') && modifiers.contains(KeyModifiers::CONTROL))
        }
        _ => false,
    }
}

fn draw(frame: &str) -> anyhow::Result<()> {
    use crossterm::{cursor, queue, terminal};
    // A pseudo-terminal nobody sized says 0×0.
    let (width, height) = match terminal::size() {
        Ok((w, h)) if w > 0 && h > 0 => (w, h),
        _ => (160, 50),
    };
    let mut out = std::io::stdout().lock();
    queue!(
        out,
        cursor::MoveTo(0, 0),
        terminal::Clear(terminal::ClearType::All)
    )?;
    let lines = frame.lines().chain(std::iter::once(""));
    for line in lines.take(usize::from(height.saturating_sub(1))) {
        let line: String = line.chars().take(usize::from(width)).collect();
        write!(out, "{line}\r\n")?;
    }
    write!(out, "q: quit")?;
    out.flush()?;
    Ok(())
}

/// Raw mode on the alternate screen, restored however `top` ends.
struct Screen;

impl Screen {
    fn enter() -> anyhow::Result<Screen> {
        crossterm::terminal::enable_raw_mode().context("terminal raw mode")?;
        let screen = Screen;
        crossterm::execute!(
            std::io::stdout(),
            crossterm::terminal::EnterAlternateScreen,
            crossterm::cursor::Hide
        )?;
        Ok(screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = crossterm::execute!(
            std::io::stdout(),
            crossterm::cursor::Show,
            crossterm::terminal::LeaveAlternateScreen
        );
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_as_users_write_them() {
        assert_eq!(parse_limit("off").unwrap(), None);
        assert_eq!(parse_limit("0").unwrap(), None);
        assert_eq!(parse_limit("20M").unwrap(), Some(Limit::auto(20 << 20)));
        assert_eq!(
            parse_limit("20M:1M").unwrap(),
            Some(Limit {
                rate: 20 << 20,
                burst: 1 << 20
            })
        );
        assert!(parse_limit("fast")
            .unwrap_err()
            .to_string()
            .contains("rate"));
        assert!(parse_limit("20M:x")
            .unwrap_err()
            .to_string()
            .contains("burst"));
        for (bad, expected) in [
            ("20M:0", "burst 0 B is below the minimum 4096 B"),
            ("20M:4095", "burst 4095 B is below"),
            ("2T", "above the maximum"),
            ("20M:2T", "burst 2199023255552 B is above"),
        ] {
            let err = parse_limit(bad).unwrap_err().to_string();
            assert!(err.contains(expected), "{bad}: {err}");
        }
        assert_eq!(
            parse_limit("1T:4K").unwrap(),
            Some(Limit {
                rate: 1 << 40,
                burst: 4096
            })
        );
    }
}
