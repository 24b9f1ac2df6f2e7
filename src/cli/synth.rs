//! `capgen synth --out DIR [--images N] [--seed S] [--force]`: writes the synthetic captioning set
//! (see `crate::data::synth`) with a progress bar on stderr and a one-line summary on stdout.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::SynthArgs;
use crate::data::synth::{generate_with, SynthOptions, CAPTIONS_FILE};
use crate::error::Result;

pub fn run(args: SynthArgs) -> Result<()> {
    let opts = SynthOptions::new(&args.out, args.images, args.seed, args.force);
    let start = Instant::now();
    let bar = ProgressBar::new(args.images as u64);
    bar.set_style(
        ProgressStyle::with_template("synth {bar:40} {pos}/{len} images [{elapsed_precise}]")
            .expect("the progress template is valid"),
    );
    let result = generate_with(&opts, &|| bar.inc(1));
    bar.finish_and_clear();
    let s = result?;
    println!(
        "wrote {} images and {} captions ({} words; train/val/test {}/{}/{}) to {} in {:.1}s; captions: {}",
        s.images,
        s.captions,
        s.words,
        s.parts[0],
        s.parts[1],
        s.parts[2],
        args.out.display(),
        start.elapsed().as_secs_f64(),
        args.out.join(CAPTIONS_FILE).display(),
    );
    Ok(())
}
