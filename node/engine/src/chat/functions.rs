//! The functions and filters chat templates call beyond minijinja's own:
//! `raise_exception`, `strftime_now` and a Python-like `tojson`, and the
//! depth check that keeps a value containing itself from being printed.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Error, ErrorKind};

use super::MAX_JSON_DEPTH;

/// `raise_exception(msg)`: HF templates call it to reject a conversation.
pub(super) fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// Days of a common year before each month.
const DAYS_BEFORE_MONTH: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, usize, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, usize::try_from(month).unwrap_or(1), day)
}

/// `secs` (UTC, since the epoch) and `millis` as RFC 3339: `2026-11-26T10:00:00.123Z`.
pub fn rfc3339(secs: i64, millis: u32) -> String {
    format!("{}.{millis:03}Z", format_time(secs, "%Y-%m-%dT%H:%M:%S"))
}

/// A small `strftime` over UTC seconds since the epoch: `%Y %y %m %d %e %B %b %A %a %H %I %M
/// %S %p %j %%`; other directives are kept as written.
pub(super) fn format_time(secs: i64, fmt: &str) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let weekday = usize::try_from((days + 4).rem_euclid(7)).unwrap_or(0);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let yday = DAYS_BEFORE_MONTH[(month + 11) % 12] + day + i64::from(leap && month > 2);
    let (hour, minute, second) = (sod / 3600, sod / 60 % 60, sod % 60);
    let month_name = MONTHS[(month + 11) % 12];
    let mut out = String::with_capacity(fmt.len() + 16);
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year.rem_euclid(100)),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('e') => write!(out, "{day:2}"),
            Some('B') => write!(out, "{month_name}"),
            Some('b') => write!(out, "{}", &month_name[..3]),
            Some('A') => write!(out, "{}", WEEKDAYS[weekday]),
            Some('a') => write!(out, "{}", &WEEKDAYS[weekday][..3]),
            Some('H') => write!(out, "{hour:02}"),
            Some('I') => write!(out, "{:02}", (hour + 11) % 12 + 1),
            Some('M') => write!(out, "{minute:02}"),
            Some('S') => write!(out, "{second:02}"),
            Some('p') => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            Some('j') => write!(out, "{yday:03}"),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

/// `strftime_now(fmt)`: the current UTC date/time (HF uses local time; servers run in UTC).
pub(super) fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
    format_time(secs, &fmt)
}

/// `tojson(indent=None)` like Python's `json.dumps(x, ensure_ascii=False)`: `", "`/`": "`
/// separators, or one item per line with `indent`; other keyword arguments are accepted and
/// ignored.
pub(super) fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = indent.and_then(|v| v.as_usize());
    let mut out = String::new();
    write_json(&mut out, value, indent, 0)?;
    Ok(Value::from_safe_string(out))
}

/// Whether `v` nests at most `depth` maps and lists deep (a value that
/// contains itself does not).
pub(super) fn nested_within(v: &Value, depth: usize) -> bool {
    match v.kind() {
        ValueKind::Map | ValueKind::Seq | ValueKind::Iterable => {
            if depth == 0 {
                return false;
            }
            let Ok(items) = v.try_iter() else {
                return true;
            };
            for (n, item) in items.enumerate() {
                if n >= 10_000 {
                    break;
                }
                let inner = if v.kind() == ValueKind::Map {
                    v.get_item(&item).unwrap_or_default()
                } else {
                    item
                };
                if !nested_within(&inner, depth - 1) {
                    return false;
                }
            }
            true
        }
        _ => true,
    }
}

fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_json(
    out: &mut String,
    v: &Value,
    indent: Option<usize>,
    depth: usize,
) -> Result<(), Error> {
    if depth > MAX_JSON_DEPTH {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "tojson: value nested too deeply",
        ));
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            let _ = write!(out, "{v}");
        }
        ValueKind::String => write_json_str(out, v.as_str().unwrap_or("")),
        ValueKind::Map | ValueKind::Seq | ValueKind::Iterable => {
            // A map iterates its keys; each is written with its value.
            let map = v.kind() == ValueKind::Map;
            out.push(if map { '{' } else { '[' });
            let items: Vec<Value> = v.try_iter()?.collect();
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                if map {
                    write_json_str(out, &item.to_string());
                    out.push_str(": ");
                    write_json(out, &v.get_item(item)?, indent, depth + 1)?;
                } else {
                    write_json(out, item, indent, depth + 1)?;
                }
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(if map { '}' } else { ']' });
        }
        _ => write_json_str(out, &v.to_string()),
    }
    Ok(())
}
