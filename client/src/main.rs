//! `tern`: the Tern command-line client. Keeps one device identity per
//! profile directory and talks to brokers through `tern-client`.

mod profile;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use tern_client::secure::{Persistence, Secure, SecureIncoming};
use tern_client::{Client, ClientConfig, Incoming};

use profile::Profile;

/// Tern command-line client.
///
/// Every command acts as the device kept in --profile (its private key never
/// leaves that directory). Start with `register`, then `send` and `recv`.
#[derive(Debug, Parser)]
#[command(name = "tern", version)]
struct Args {
    /// Broker address HOST:PORT; repeat (or separate with commas) to give
    /// fallbacks tried in order.
    #[arg(long, env = "TERN_BROKER", value_delimiter = ',', global = true)]
    broker: Vec<String>,
    /// PEM certificate to trust: the broker's `<data-dir>/tls/cert.pem`, or your CA.
    #[arg(long, env = "TERN_CA", global = true)]
    ca: Option<PathBuf>,
    /// Profile directory holding this device's key and handle.
    #[arg(long, env = "TERN_PROFILE", global = true)]
    profile: Option<PathBuf>,
    /// TLS server name, when it differs from the broker address's host.
    #[arg(long, env = "TERN_SERVER_NAME", global = true)]
    server_name: Option<String>,
    /// More log output on stderr (-v, -vv).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Claim a handle: makes this profile's device key and registers it as device 1.
    Register {
        /// The handle (1-64 of a-z 0-9 . _ -).
        user: String,
        /// Registration token, if the broker requires one.
        #[arg(long, env = "TERN_REGISTRATION_TOKEN")]
        token: Option<String>,
    },
    /// Send a text message, encrypted end to end for every device of USER
    /// and your other devices; exits 0 once the broker has it on disk,
    /// printing its id.
    Send {
        /// Recipient handle.
        user: String,
        /// The text.
        text: String,
        /// Print a JSON object instead of the bare id.
        #[arg(long)]
        json: bool,
        /// Ask for no delivered receipt: the recipient's devices acknowledge
        /// it without telling this device (a receipt saying it can never be
        /// delivered still comes).
        #[arg(long)]
        no_receipt: bool,
    },
    /// Receive messages, decrypt them, print one line each, and
    /// acknowledge them.
    Recv {
        /// Exit 0 once this many lines were printed: messages, and with
        /// --receipts delivery receipts too (default: run until --timeout or Ctrl-C).
        #[arg(long)]
        count: Option<u64>,
        /// Give up after this many seconds (fractions allowed; exit status 3
        /// if --count was not reached). `inf` waits without a limit, like
        /// leaving it out.
        #[arg(long, value_name = "SECS|inf", value_parser = parse_timeout)]
        timeout: Option<Duration>,
        /// One JSON object per line: id, from, from_device, to, seq, sent_at_ms,
        /// text; receipts (with --receipts) have receipt, state
        /// ("delivered" or "read"), handle, device, seq, and delivered_at_ms
        /// or read_at_ms; a message that could not be decrypted has id,
        /// from, from_device, seq and error.
        #[arg(long)]
        json: bool,
        /// Also print delivered and read receipts for messages this user
        /// sent (they count towards --count).
        #[arg(long)]
        receipts: bool,
        /// Tell each sender (end to end) that its messages were read, once
        /// printed.
        #[arg(long)]
        mark_read: bool,
        /// Also show the presence (online, last seen) and typing of the
        /// users you converse with, as they change (they do not count
        /// towards --count). With --json: {"presence":USER,"online":..,
        /// "last_seen_ms":..} and {"typing":USER,"from_device":..,"active":..}.
        #[arg(long)]
        presence: bool,
    },
    /// Tell USER's online devices that you are typing (or, with --stop,
    /// that you stopped). Ephemeral: shown only to users you converse with.
    Typing {
        /// The handle.
        user: String,
        /// You stopped typing.
        #[arg(long)]
        stop: bool,
    },
    /// Show or change who may see your presence (online, last seen,
    /// typing): users you converse with see it if they allow you too;
    /// `--visibility nobody` hides yours and shows you nobody's.
    Presence {
        /// `conversations` (the users allowed, reciprocally) or `nobody`.
        #[arg(long, value_parser = ["conversations", "nobody"])]
        visibility: Option<String>,
        /// Allow this user (repeatable).
        #[arg(long)]
        allow: Vec<String>,
        /// Stop allowing this user (repeatable).
        #[arg(long)]
        disallow: Vec<String>,
        /// One JSON object: visibility, allowed.
        #[arg(long)]
        json: bool,
    },
    /// List a user's devices (default: your own), with the time each was
    /// added (RFC 3339, UTC).
    Devices {
        /// The handle.
        user: Option<String>,
        /// One JSON object per device and line: handle, device_id, public_key
        /// (hex), added_at_ms (ms since the Unix epoch).
        #[arg(long)]
        json: bool,
    },
    /// Show this profile's identity.
    Whoami,
    /// For a new device: make this profile's key (if needed) and print its public key.
    LinkKey,
    /// Approve another device's public key to join your user; prints a token for `tern link`.
    Approve {
        /// The new device's public key (hex, from `tern link-key`).
        public_key: String,
        /// How long the approval stays valid, in seconds.
        #[arg(long, default_value_t = 600)]
        ttl_secs: u64,
    },
    /// Join USER as a new device using an approval token from one of its devices.
    Link {
        /// The handle to join.
        user: String,
        /// Token printed by `tern approve` on an existing device.
        token: String,
    },
    /// Set your profile, or read anyone's.
    Profile {
        #[command(subcommand)]
        action: ProfileAction,
    },
    /// Register (or remove) this device's Web Push subscription, for
    /// content-free wake-ups while it is not connected.
    Push {
        #[command(subcommand)]
        action: PushAction,
    },
    /// Unlink one of your devices: at once its connection is closed, its
    /// queue and keys dropped, and it can never log in again. A device may
    /// unlink itself; the primary (lowest-numbered) device any other.
    Unlink {
        /// The device number (see `tern devices`).
        device: u32,
    },
}

#[derive(Debug, Subcommand)]
enum PushAction {
    /// Register the fields of a Web Push subscription (RFC 8030; what a
    /// browser's `PushSubscription` or a UnifiedPush distributor gives);
    /// prints the broker's VAPID public key (base64url), which must be the
    /// subscription's application server key.
    Register {
        /// The push endpoint URL.
        #[arg(long)]
        endpoint: String,
        /// The subscription's P-256 public key, base64url (`keys.p256dh`).
        #[arg(long)]
        p256dh: String,
        /// The subscription's authentication secret, base64url (`keys.auth`).
        #[arg(long)]
        auth: String,
    },
    /// Stop wake-ups for this device.
    Unregister,
}

#[derive(Debug, Subcommand)]
enum ProfileAction {
    /// Change your profile; fields not given are kept ("" clears one).
    Set {
        /// Display name (at most 64 characters).
        #[arg(long)]
        name: Option<String>,
        /// Status text (at most 140 characters).
        #[arg(long)]
        status: Option<String>,
        /// Picture: a media reference (at most 256 bytes).
        #[arg(long)]
        picture: Option<String>,
    },
    /// Show a user's profile.
    Get {
        /// The handle.
        user: String,
        /// One JSON object: handle, name, status, picture, updated_at_ms.
        #[arg(long)]
        json: bool,
    },
}

/// `--timeout`: seconds, or `inf` for no limit ([`Duration::MAX`]).
fn parse_timeout(text: &str) -> Result<Duration, String> {
    if matches!(text.to_ascii_lowercase().as_str(), "inf" | "infinity") {
        return Ok(Duration::MAX);
    }
    let secs: f64 = text.parse().map_err(|_| format!("{text:?} is not a number of seconds (or `inf`)"))?;
    if secs.is_nan() || secs < 0.0 {
        return Err(format!("{text} is not a number of seconds >= 0 (or `inf`)"));
    }
    // Beyond what a Duration holds is as good as no limit.
    Ok(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
}

/// Milliseconds since the Unix epoch as an RFC 3339 UTC time with
/// milliseconds, `2025-01-31T12:00:00.000Z` (the raw number if out of range).
fn rfc3339_ms(ms: u64) -> String {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000) else {
        return format!("{ms} ms");
    };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

fn config(args: &Args) -> anyhow::Result<ClientConfig> {
    if args.broker.is_empty() {
        bail!("no broker given: pass --broker HOST:PORT (or set TERN_BROKER)");
    }
    let Some(ca) = &args.ca else {
        bail!("no CA given: pass --ca FILE, the broker's <data-dir>/tls/cert.pem (or set TERN_CA)");
    };
    let mut c = ClientConfig::new(args.broker.clone(), ca);
    c.server_name = args.server_name.clone();
    c.client_name = concat!("tern-cli/", env!("CARGO_PKG_VERSION")).into();
    Ok(c)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    let level = match args.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt().with_env_filter(level).with_writer(std::io::stderr).init();
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tern: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let profile = Profile::open(args.profile.clone())?;
    match &args.command {
        Command::Register { user, token } => {
            if profile.identity()?.is_some() {
                bail!("profile {} already holds an identity; use another --profile", profile.dir().display());
            }
            let (client, identity) = Client::register(config(&args)?, user, token.as_deref())
                .await
                .with_context(|| format!("cannot register {user}"))?;
            profile.save(&identity)?;
            // Publish this device's end-to-end keys, so others can write to it.
            let secure = Secure::open(client, profile.dir(), Persistence::Shared).await?;
            secure.close().await;
            println!("registered {} (device {})", identity.handle, identity.device_id);
        }
        Command::Send { user, text, json, no_receipt } => {
            let secure = connect_secure(&args, &profile).await?;
            let payload = tern_protocol::pb::E2ePayload {
                kind: Some(tern_protocol::pb::e2e_payload::Kind::Text(text.clone())),
                replaces: Default::default(),
            };
            let options = tern_client::SendOptions { receipt: !*no_receipt };
            let sent = secure.send_payload(user, &payload, random_id(), options).await;
            secure.close().await;
            let receipt = sent.with_context(|| format!("send to {user}"))?;
            if *json {
                let out = serde_json::json!({
                    "id": receipt.message_id.to_string(),
                    "to": user,
                    "duplicate": receipt.duplicate,
                    "accepted_at_ms": receipt.accepted_at_ms,
                    "recipients": receipt.recipients,
                });
                println!("{out}");
            } else {
                println!("{}", receipt.message_id);
            }
        }
        Command::Recv { count, timeout, json, receipts, mark_read, presence } => {
            let secure = connect_secure(&args, &profile).await?;
            if *presence {
                watch_conversations(secure.client(), *json).await?;
            }
            let how = Printing { json: *json, receipts: *receipts, mark_read: *mark_read, presence: *presence };
            return recv(&secure, *count, *timeout, how).await;
        }
        Command::Typing { user, stop } => {
            let client = connect(&args, &profile).await?;
            client.typing(user, !*stop).await;
            // The round trip carries the datagram out before the close.
            let _ = client.ping().await;
            client.close().await;
        }
        Command::Presence { visibility, allow, disallow, json } => {
            let client = connect(&args, &profile).await?;
            let visibility = visibility.as_deref().map(|v| match v {
                "nobody" => tern_protocol::pb::PresenceVisibility::Nobody as i32,
                _ => tern_protocol::pb::PresenceVisibility::Conversations as i32,
            });
            let update =
                tern_protocol::pb::SetPresence { visibility, allow: allow.clone(), disallow: disallow.clone() };
            let settings = client.set_presence(update).await;
            client.close().await;
            let s = settings.context("presence settings")?;
            let shown = if s.visibility == tern_protocol::pb::PresenceVisibility::Nobody as i32 {
                "nobody"
            } else {
                "conversations"
            };
            if *json {
                println!("{}", serde_json::json!({ "visibility": shown, "allowed": s.allowed }));
            } else {
                println!("visibility: {shown}; allowed: {}", s.allowed.join(", "));
            }
        }
        Command::Profile { action } => {
            let client = connect(&args, &profile).await?;
            let (shown, json) = match action {
                ProfileAction::Set { name, status, picture } => {
                    let update = tern_protocol::pb::SetProfile {
                        name: name.clone(),
                        status: status.clone(),
                        picture: picture.clone(),
                    };
                    (client.set_profile(update).await.context("set the profile"), false)
                }
                ProfileAction::Get { user, json } => {
                    (client.profile(user).await.with_context(|| format!("profile of {user}")), *json)
                }
            };
            client.close().await;
            let p = shown?;
            if json {
                let line = serde_json::json!({
                    "handle": p.handle, "name": p.name, "status": p.status, "picture": p.picture,
                    "updated_at_ms": p.updated_at_ms,
                });
                println!("{line}");
            } else {
                let when = if p.updated_at_ms == 0 { "never set".to_owned() } else { rfc3339_ms(p.updated_at_ms) };
                println!(
                    "{}  name: {:?}  status: {:?}  picture: {:?}  ({when})",
                    p.handle, p.name, p.status, p.picture
                );
            }
        }
        Command::Push { action } => {
            let client = connect(&args, &profile).await?;
            let done = match action {
                PushAction::Register { endpoint, p256dh, auth } => {
                    let decode = |what: &str, text: &str| {
                        use base64::Engine as _;
                        let t = text.trim().trim_end_matches('=');
                        base64::engine::general_purpose::URL_SAFE_NO_PAD
                            .decode(t)
                            .with_context(|| format!("--{what} is not base64url"))
                    };
                    let req = tern_protocol::pb::RegisterPush {
                        endpoint: endpoint.clone(),
                        p256dh: decode("p256dh", p256dh)?.into(),
                        auth: decode("auth", auth)?.into(),
                    };
                    client.register_push(req).await.context("register push")
                }
                PushAction::Unregister => client.unregister_push().await.context("unregister push"),
            };
            client.close().await;
            let r = done?;
            use base64::Engine as _;
            let key = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&r.vapid_public_key);
            if r.registered {
                println!("registered; the broker's VAPID key (applicationServerKey): {key}");
            } else {
                println!("unregistered");
            }
        }
        Command::Unlink { device } => {
            let client = connect(&args, &profile).await?;
            let list = client.unlink(*device).await.with_context(|| format!("unlink device {device}"))?;
            client.close().await;
            let left: Vec<String> = list.devices.iter().map(|d| d.device_id.to_string()).collect();
            println!("unlinked {}/{device}; devices now: {}", list.handle, left.join(", "));
        }
        Command::Devices { user, json } => {
            let client = connect(&args, &profile).await?;
            let handle = user.clone().unwrap_or_else(|| client.identity().handle.clone());
            let list = client.devices(&handle).await.with_context(|| format!("devices of {handle}"))?;
            client.close().await;
            for d in list.devices {
                let key = hex::encode(&d.public_key);
                if *json {
                    let line = serde_json::json!({
                        "handle": handle, "device_id": d.device_id, "public_key": key, "added_at_ms": d.added_at_ms,
                        "identity_key": hex::encode(&d.identity_key), "list_version": list.version,
                    });
                    println!("{line}");
                } else {
                    println!("{handle}/{}  {key}  added {}", d.device_id, rfc3339_ms(d.added_at_ms));
                }
            }
        }
        Command::Whoami => match profile.identity()? {
            Some(id) => println!("{} (device {}) key {}", id.handle, id.device_id, hex::encode(id.public_key())),
            None => bail!("no identity in {}: run `tern register USER` first", profile.dir().display()),
        },
        Command::LinkKey => {
            if profile.identity()?.is_some() {
                bail!(
                    "profile {} is already a device; use a new --profile for the new device",
                    profile.dir().display()
                );
            }
            let key = profile.key_or_create()?;
            println!("{}", hex::encode(key.verifying_key().to_bytes()));
        }
        Command::Approve { public_key, ttl_secs } => {
            let identity = profile.require_identity()?;
            let key: [u8; 32] = hex::decode(public_key.trim())
                .ok()
                .and_then(|k| k.try_into().ok())
                .context("the public key is 64 hex digits (from `tern link-key`)")?;
            let approval = identity.approve(&key, Duration::from_secs(*ttl_secs));
            println!("{}", tern_client::approval_to_token(&approval));
        }
        Command::Link { user, token } => {
            let approval = tern_client::approval_from_token(token)?;
            let key = profile.key_or_create()?;
            let (client, identity) = Client::link_device(config(&args)?, user, key, &approval)
                .await
                .with_context(|| format!("cannot link this device to {user}"))?;
            profile.save(&identity)?;
            let secure = Secure::open(client, profile.dir(), Persistence::Shared).await?;
            secure.close().await;
            println!("linked as {} (device {})", identity.handle, identity.device_id);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn connect(args: &Args, profile: &Profile) -> anyhow::Result<Client> {
    let identity = profile.require_identity()?;
    Client::connect(config(args)?, identity).await.context("cannot log in")
}

async fn connect_secure(args: &Args, profile: &Profile) -> anyhow::Result<Secure> {
    let client = connect(args, profile).await?;
    Secure::open(client, profile.dir(), Persistence::Shared).await.context("cannot open the end-to-end state")
}

fn random_id() -> tern_client::MessageId {
    tern_client::MessageId(rand::random())
}

/// What `tern recv` prints.
#[derive(Debug, Clone, Copy)]
struct Printing {
    json: bool,
    receipts: bool,
    mark_read: bool,
    presence: bool,
}

/// Watches the presence of the users this one converses with and prints
/// their state now.
async fn watch_conversations(client: &Client, json: bool) -> anyhow::Result<()> {
    let settings = client.set_presence(Default::default()).await.context("presence settings")?;
    let list = client.watch_presence(&settings.allowed).await.context("watch presence")?;
    for state in list.states.iter().filter(|s| s.visible) {
        println!("{}", render_presence(state, json));
    }
    Ok(())
}

fn render_presence(s: &tern_protocol::pb::PresenceState, json: bool) -> String {
    if json {
        return serde_json::json!({ "presence": s.handle, "online": s.online, "last_seen_ms": s.last_seen_ms })
            .to_string();
    }
    match (s.online, s.last_seen_ms) {
        (true, _) => format!("{} is online", s.handle),
        (false, 0) => format!("{} is offline", s.handle),
        (false, at) => format!("{} was last seen {}", s.handle, rfc3339_ms(at)),
    }
}

fn render_ephemeral(d: tern_protocol::pb::Datagram, json: bool) -> Option<String> {
    use tern_protocol::pb::datagram::Kind;
    match d.kind? {
        Kind::Presence(s) => Some(render_presence(&s, json)),
        Kind::Typing(t) if json => {
            Some(serde_json::json!({ "typing": t.from, "from_device": t.from_device, "active": t.typing }).to_string())
        }
        Kind::Typing(t) if t.typing => Some(format!("{}/{} is typing", t.from, t.from_device)),
        Kind::Typing(t) => Some(format!("{}/{} stopped typing", t.from, t.from_device)),
    }
}

async fn recv(
    secure: &Secure,
    count: Option<u64>,
    timeout: Option<Duration>,
    how: Printing,
) -> anyhow::Result<ExitCode> {
    // No deadline for `inf` (or anything too far off to represent).
    let deadline = timeout.and_then(|t| tokio::time::Instant::now().checked_add(t));
    let mut got = 0u64;
    // Locked per line: presence and typing lines come from another task.
    let mut stdout = std::io::stdout();
    if how.presence {
        let client = secure.client().clone();
        tokio::spawn(async move {
            while let Some(d) = client.next_ephemeral().await {
                if let Some(line) = render_ephemeral(d, how.json) {
                    println!("{line}");
                }
            }
        });
    }
    while count.is_none_or(|n| got < n) {
        let next = async {
            match deadline {
                Some(d) => tokio::time::timeout_at(d, secure.recv()).await.ok(),
                None => Some(secure.recv().await),
            }
        };
        let item = tokio::select! {
            item = next => item,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Some(item) = item else {
            secure.close().await;
            if let Some(n) = count {
                let what = if how.receipts { "messages and receipts" } else { "messages" };
                let secs = timeout.unwrap_or_default().as_secs_f64();
                eprintln!("tern: timed out after {secs:.1} s with {got} of {n} {what}");
                return Ok(ExitCode::from(3));
            }
            return Ok(ExitCode::SUCCESS);
        };
        let Some(item) = item else { bail!("the client stopped (login refused or replaced by another connection)") };
        if let Some(line) = render(&item, how) {
            writeln!(stdout, "{line}")?;
            stdout.flush()?;
            got += 1;
        }
        secure.ack(item.seq()).await;
        // After the ack: the sender sees delivered, then read.
        if let (true, SecureIncoming::Message { from, id, .. }) = (how.mark_read, &item) {
            if let Err(e) = secure.send_read(from, &[*id]).await {
                eprintln!("tern: cannot tell {from} that {id} was read: {e}");
            }
        }
    }
    secure.close().await;
    Ok(ExitCode::SUCCESS)
}

/// The line `tern recv` prints for an item, if any.
fn render(item: &SecureIncoming, how: Printing) -> Option<String> {
    let json = how.json;
    match item {
        SecureIncoming::Message { seq, id, from, from_device, to, sent_at_ms, text } => Some(if json {
            serde_json::json!({
                "id": id.to_string(), "from": from, "from_device": from_device, "to": to,
                "seq": seq, "sent_at_ms": sent_at_ms, "text": text,
            })
            .to_string()
        } else {
            format!("{from}: {text}")
        }),
        SecureIncoming::Failed { seq, id, from, from_device, error } => Some(if json {
            serde_json::json!({
                "id": id.to_string(), "from": from, "from_device": from_device, "seq": seq, "error": error,
            })
            .to_string()
        } else {
            format!("{from}/{from_device}: message {id} could not be decrypted ({error}); asked to send it again")
        }),
        SecureIncoming::Read { seq, from, from_device, message_ids, read_at_ms } if how.receipts => {
            let ids: Vec<String> = message_ids.iter().map(ToString::to_string).collect();
            Some(if json {
                serde_json::json!({
                    "receipt": ids.first(), "receipts": ids, "state": "read", "handle": from,
                    "device": from_device, "seq": seq, "read_at_ms": read_at_ms,
                })
                .to_string()
            } else {
                format!("read {} by {from}/{from_device}", ids.join(", "))
            })
        }
        SecureIncoming::Receipt(Incoming::Receipt { message_id, handle, device, delivered_at_ms, seq, failed })
            if how.receipts =>
        {
            Some(if json {
                serde_json::json!({
                    "receipt": message_id.to_string(), "state": "delivered", "handle": handle, "device": device,
                    "seq": seq, "delivered_at_ms": delivered_at_ms,
                    "error": failed.map(|code| code.as_str_name()),
                })
                .to_string()
            } else if let Some(code) = failed {
                format!("not delivered {message_id} to {handle}/{device}: {}", code.as_str_name())
            } else {
                format!("delivered {message_id} to {handle}/{device}")
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_seconds_or_inf() {
        assert_eq!(parse_timeout("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_timeout("0"), Ok(Duration::ZERO));
        for inf in ["inf", "INF", "infinity", "1e400"] {
            assert_eq!(parse_timeout(inf), Ok(Duration::MAX), "{inf}");
        }
        for bad in ["nan", "-1", "", "10s"] {
            assert!(parse_timeout(bad).unwrap_err().contains("inf"), "{bad}");
        }
    }

    #[test]
    fn dates_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339_ms(u64::MAX), format!("{} ms", u64::MAX));
    }
}
