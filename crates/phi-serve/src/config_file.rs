//! `--config FILE` (or `PHI_SERVE_CONFIG`): a subcommand's settings from a TOML file.
//!
//! The file's keys are the subcommand's long flags (`max-batch-size` or `max_batch_size`),
//! its values strings, numbers, booleans (for switches) or arrays (for repeatable flags):
//!
//! ```toml
//! model = "microsoft/Phi-3-mini-4k-instruct"
//! host = "0.0.0.0"
//! max-batch-size = 16
//! cors-allow-origin = ["https://app.example.com"]
//! allow-unauthenticated = false
//! ```
//!
//! Precedence, highest first: the command line, then the flag's environment variable
//! (`PHI_SERVE_*`), then the file, then the built-in default. The file's settings are turned
//! into the flags they name, inserted after the subcommand for those the command line and the
//! environment leave unset, so clap checks every value as it checks a flag (its errors name the
//! flag). A key that is no flag of the subcommand is an error that names it.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{ArgAction, Command};

/// The environment variable that names a config file.
pub const CONFIG_ENV: &str = "PHI_SERVE_CONFIG";

/// `args` (the whole command line, program name first) with the settings of the config file,
/// if the command line (`--config F`) or the environment names one.
pub fn with_config_file(cli: &Command, args: Vec<OsString>) -> Result<Vec<OsString>> {
    let text: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let Some(sub_pos) = text.iter().skip(1).position(|a| cli.find_subcommand(a).is_some()) else {
        return Ok(args);
    };
    let sub_pos = sub_pos + 1;
    let sub = cli.find_subcommand(&text[sub_pos]).expect("found above");
    let rest = &text[sub_pos + 1..];
    let path = match flag_value(rest, "config") {
        Some(p) => PathBuf::from(p),
        None => match std::env::var_os(CONFIG_ENV) {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => return Ok(args),
        },
    };
    let source = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let table: toml::Table = toml::from_str(&source)
        .with_context(|| format!("the config file {} is not valid TOML", path.display()))?;

    let mut inserted: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let arg = sub
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && !a.is_hide_set())
            .filter(|_| long != "config" && long != "help")
            .with_context(|| {
                format!(
                    "{}: unknown setting `{key}` (the settings are the long flags that \
                     `phi-serve {} --help` lists)",
                    path.display(),
                    sub.get_name()
                )
            })?;
        if flag_given(rest, &long) {
            continue; // the command line wins
        }
        if arg.get_env().is_some_and(|env| std::env::var_os(env).is_some()) {
            continue; // then the environment
        }
        let flag = format!("--{long}");
        let scalar = |v: &toml::Value| -> Result<String> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                toml::Value::Boolean(b) => Ok(b.to_string()),
                other => {
                    bail!("{}: `{key}` is a {}, not a value", path.display(), other.type_str())
                }
            }
        };
        match (arg.get_action(), value) {
            (ArgAction::SetTrue, toml::Value::Boolean(on)) => {
                if *on {
                    inserted.push(flag.into());
                }
            }
            (ArgAction::SetTrue, other) => {
                bail!("{}: `{key}` is a switch: true or false, not {other}", path.display())
            }
            (ArgAction::Append, toml::Value::Array(items)) => {
                for item in items {
                    inserted.push(flag.clone().into());
                    inserted.push(scalar(item)?.into());
                }
            }
            (_, toml::Value::Array(_)) => {
                bail!("{}: `{key}` takes one value, not a list", path.display())
            }
            (_, v) => {
                inserted.push(flag.into());
                inserted.push(scalar(v)?.into());
            }
        }
    }
    let mut out = args;
    let at = sub_pos + 1;
    out.splice(at..at, inserted);
    Ok(out)
}

/// The value of `--name V` or `--name=V` in `args`.
fn flag_value(args: &[String], name: &str) -> Option<String> {
    let flag = format!("--{name}");
    let eq = format!("--{name}=");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            return None;
        }
        if *a == flag {
            return it.next().cloned();
        }
        if let Some(v) = a.strip_prefix(&eq) {
            return Some(v.to_string());
        }
    }
    None
}

/// Whether `--name` appears in `args` (with or without `=`).
fn flag_given(args: &[String], name: &str) -> bool {
    let flag = format!("--{name}");
    let eq = format!("--{name}=");
    args.iter().take_while(|a| *a != "--").any(|a| *a == flag || a.starts_with(&eq))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli() -> Command {
        Command::new("p").subcommand(
            Command::new("serve")
                .arg(clap::Arg::new("config").long("config"))
                .arg(clap::Arg::new("port").long("port").env("TEST_CFG_PORT_UNSET"))
                .arg(clap::Arg::new("name").long("served-model-name"))
                .arg(
                    clap::Arg::new("open").long("allow-unauthenticated").action(ArgAction::SetTrue),
                )
                .arg(clap::Arg::new("origin").long("cors-allow-origin").action(ArgAction::Append)),
        )
    }

    fn run(file: &str, args: &[&str]) -> Result<Vec<String>> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("phi-cfg-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, file).unwrap();
        let mut full: Vec<OsString> =
            vec!["p".into(), "serve".into(), "--config".into(), path.clone().into()];
        full.extend(args.iter().map(OsString::from));
        let out = with_config_file(&cli(), full);
        std::fs::remove_dir_all(&dir).unwrap();
        Ok(out?
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .skip(2)
            .take_while(|a| a != "--config")
            .collect())
    }

    #[test]
    fn settings_become_flags_unless_given() {
        let file = "port = 9000\nserved_model_name = \"f\"\nallow-unauthenticated = true\n\
                    cors-allow-origin = [\"https://a\", \"https://b\"]\n";
        let got = run(file, &[]).unwrap();
        for want in ["--port", "9000", "--served-model-name", "f", "--allow-unauthenticated"] {
            assert!(got.contains(&want.to_string()), "{want} not in {got:?}");
        }
        assert_eq!(got.iter().filter(|a| *a == "--cors-allow-origin").count(), 2);
        // The command line wins.
        let got = run(file, &["--port", "1"]).unwrap();
        assert!(!got.contains(&"9000".to_string()), "{got:?}");
        let got = run("allow-unauthenticated = false\n", &[]).unwrap();
        assert!(got.is_empty(), "{got:?}");
    }

    #[test]
    fn bad_files_name_the_setting() {
        let e = run("prot = 1\n", &[]).unwrap_err().to_string();
        assert!(e.contains("unknown setting `prot`"), "{e}");
        let e = run("allow-unauthenticated = 1\n", &[]).unwrap_err().to_string();
        assert!(e.contains("`allow-unauthenticated` is a switch"), "{e}");
        let e = run("port = [1, 2]\n", &[]).unwrap_err().to_string();
        assert!(e.contains("`port` takes one value"), "{e}");
        let e = run("port = \n", &[]).unwrap_err();
        assert!(format!("{e:#}").contains("not valid TOML"), "{e:#}");
    }
}
