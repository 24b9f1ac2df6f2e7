//! The training tokenizer: lower-case, strip punctuation, split on whitespace.
//!
//! Rules, character by character (Unicode-aware):
//! - letters and digits are kept, lower-cased (`char::to_lowercase`, so `É` → `é`); combining marks
//!   (U+0300..U+036F) stay attached to their letter;
//! - apostrophes (`'` `’` `‘` `` ` `` `´`) and hyphens (`-` U+2010 U+2011 U+00AD) are **deleted**, joining
//!   the pieces: `t-shirt` → `tshirt`, `dog's` → `dogs`, Flickr's pre-split `dog 's` → `dog s`.
//!   Deleting punctuation is what neuraltalk's preprocessing did (`translate(None,
//!   string.punctuation)`), which most published Flickr vocabularies follow;
//! - every other character that is not a letter, digit or whitespace (ASCII and Unicode punctuation,
//!   dashes, quotes, symbols, emoji) becomes a separator, so `dog,cat` → `dog cat` rather than
//!   `dogcat`;
//! - whitespace separates tokens; empty tokens are dropped.
//!
//! The metrics module has its own COCO/PTB-compatible tokenizer; this one is for training only.

/// Splits a caption into lower-case word tokens.
pub fn tokenize(caption: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut cur = String::new();
    for c in caption.chars() {
        if c.is_alphanumeric() || is_combining_mark(c) {
            cur.extend(c.to_lowercase());
        } else if is_joiner(c) {
            // deleted: the word goes on
        } else if !cur.is_empty() {
            // whitespace, punctuation, symbols: end of the current token
            tokens.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        tokens.push(cur);
    }
    tokens
}

/// Apostrophes and hyphens: removed without splitting the word.
fn is_joiner(c: char) -> bool {
    matches!(c, '\'' | '\u{2019}' | '\u{2018}' | '`' | '\u{B4}' | '-' | '\u{2010}' | '\u{2011}' | '\u{AD}')
}

fn is_combining_mark(c: char) -> bool {
    ('\u{300}'..='\u{36F}').contains(&c)
}
