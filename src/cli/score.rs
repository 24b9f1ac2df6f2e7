//! `capgen score --refs REFS.json --hyps HYPS.json [--bleu coco|nltk] [--json]` (DESIGN.md section 4).
//!
//! Images in REFS without a hypothesis are left out of the scores (as the COCO evaluation does, which
//! scores the result file's images) with a one-line warning on stderr giving their count; a
//! hypothesis for an image missing from REFS, duplicate hypothesis ids, an empty reference list or
//! malformed files are errors.

use crate::cli::ScoreArgs;
use crate::error::Result;
use crate::metrics::{self, BleuMode};

pub fn run(args: &ScoreArgs) -> Result<()> {
    let mode: BleuMode = args.bleu.parse()?;
    let s = metrics::score_files(&args.refs, &args.hyps, mode)?;
    if s.unscored_images > 0 {
        eprintln!(
            "warning: {} of {} images in {} have no hypothesis and are not scored",
            s.unscored_images,
            s.unscored_images + s.images,
            args.refs.display()
        );
    }
    if args.json {
        println!("{}", s.to_json());
    } else {
        for line in s.lines() {
            println!("{line}");
        }
    }
    Ok(())
}
