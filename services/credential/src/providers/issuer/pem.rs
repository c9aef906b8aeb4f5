//! Just enough PEM to read a PKCS#8 key and certificates: the base64 body between a
//! `-----BEGIN <label>-----` and its `-----END <label>-----`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// The DER of every `label` block in `text`, in order; `None` for an unterminated block or a
/// body that is not base64 (the caller says so without showing the text: it may be a key).
pub fn blocks(text: &str, label: &str) -> Option<Vec<Vec<u8>>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(&begin) {
        let body_and_after = &rest[start + begin.len()..];
        let stop = body_and_after.find(&end)?;
        let body: String = body_and_after[..stop]
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        found.push(STANDARD.decode(body).ok()?);
        rest = &body_and_after[stop + end.len()..];
    }
    Some(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_block_of_its_label_only() {
        let text = "-----BEGIN CERTIFICATE-----\nAQID\n-----END CERTIFICATE-----\n\
                    -----BEGIN PRIVATE KEY-----\nBAU=\n-----END PRIVATE KEY-----\n\
                    -----BEGIN CERTIFICATE-----\nBg==\n-----END CERTIFICATE-----\n";
        assert_eq!(
            blocks(text, "CERTIFICATE").unwrap(),
            vec![vec![1, 2, 3], vec![6]]
        );
        assert_eq!(blocks(text, "PRIVATE KEY").unwrap(), vec![vec![4, 5]]);
        assert!(blocks("-----BEGIN CERTIFICATE-----\nAQID\n", "CERTIFICATE").is_none());
        assert!(blocks("nothing here", "CERTIFICATE").unwrap().is_empty());
    }
}
