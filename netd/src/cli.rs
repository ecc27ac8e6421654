//! clap value parsers shared by the option structs of several modules
//! (`daemon::config`, `dnat`) and the binaries; they say what is wrong, not
//! what was given: clap's message already quotes the value and names the
//! flag.

/// clap value parser for `--flag[=BOOL]` options: true|false|1|0|yes|no.
pub fn parse_bool(text: &str) -> Result<bool, String> {
    match text {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err("not a boolean (true|false|1|0|yes|no)".into()),
    }
}
