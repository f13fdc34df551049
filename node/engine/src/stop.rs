//! Stop sequences over streamed text: text is released as soon as it can
//! no longer be the start of a stop sequence, and cut where one matches.
//! Pure, so the HTTP layer and tests share it.

/// Most stop sequences per request (OpenAI's limit).
pub const STOPS_MAX: usize = 4;

/// Longest stop sequence, bytes.
pub const STOP_BYTES_MAX: usize = 256;

/// Watches generated text for stop sequences.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Checks the settings; the error names the problem.
    pub fn validate(stops: &[String]) -> Result<(), String> {
        if stops.len() > STOPS_MAX {
            return Err(format!(
                "at most {STOPS_MAX} stop sequences, got {}",
                stops.len()
            ));
        }
        if let Some(s) = stops.iter().find(|s| s.len() > STOP_BYTES_MAX) {
            return Err(format!(
                "stop sequence of {} bytes, at most {STOP_BYTES_MAX}",
                s.len()
            ));
        }
        Ok(())
    }

    /// Takes new text; returns what can be shown now, and whether a stop
    /// sequence matched (the text from it on is dropped).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (text.to_string(), false);
        }
        self.held.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        let keep = self
            .stops
            .iter()
            .map(|s| longest_prefix_suffix(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// Text still held back at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Bytes of the longest proper prefix of `stop` that `text` ends with (on
/// character boundaries).
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len())
        .rev()
        .filter(|&k| stop.is_char_boundary(k))
        .find(|&k| text.ends_with(&stop[..k]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (t, stopped) = m.push(p);
            out += &t;
            if stopped {
                return (out, true);
            }
        }
        out += &m.finish();
        (out, false)
    }

    #[test]
    fn cuts_at_a_stop_split_across_pieces() {
        assert_eq!(
            run(&["\n\n"], &["Hello", "\n", "\nWorld"]),
            ("Hello".into(), true)
        );
        assert_eq!(
            run(&["END"], &["abc E", "N", "D tail"]),
            ("abc ".into(), true)
        );
        assert_eq!(run(&["xyz"], &["abc", "xy", "q"]), ("abcxyq".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&["é!"], &["café", "!"]), ("caf".into(), true));
    }

    #[test]
    fn releases_text_that_cannot_start_a_stop() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("hello S"), ("hello ".into(), false));
        assert_eq!(m.push("x"), ("Sx".into(), false));
    }

    #[test]
    fn limits_are_checked() {
        assert!(StopMatcher::validate(&vec!["a".into(); 5]).is_err());
        assert!(StopMatcher::validate(&["a".repeat(300)]).is_err());
        assert!(StopMatcher::validate(&["a".into()]).is_ok());
    }
}
