"""Writes tests/data/metrics_golden.json: caption corpora scored by the reference implementations.

For each corpus (seeded, realistic caption words plus edge cases) it stores the raw captions, the
captions as pycocoevalcap's PTBTokenizer tokenises them (Stanford CoreNLP 3.4.1 via Java, lower-cased,
punctuation removed), and the corpus scores computed on those tokens by pycocoevalcap's Bleu(4), Cider
and Rouge and by nltk.translate.bleu_score.corpus_bleu (weights (1,), (1/2,)*2, (1/3,)*3, (1/4,)*4, no
smoothing). It also stores tokenizer cases (raw caption -> PTB tokens): hand-written and generated
captions that must all match, and adversarial strings (punctuation glued to words) of which most must
match. tests/metrics_golden.rs replays all of it against src/metrics.

Rerun (needs Java on PATH; takes a few seconds):
    python tools/make_metrics_golden.py
"""

import json
import os
import random
import warnings

from nltk.translate.bleu_score import corpus_bleu
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "metrics_golden.json")

SUBJ = ["a dog", "a black dog", "two dogs", "a man", "a young boy", "a girl", "the woman", "a child",
        "three people", "a brown and white dog", "a little girl", "a group of people", "a person",
        "a biker", "a skier", "two men", "a small child", "the boy", "a football player", "a surfer"]
VERB = ["runs", "is running", "jumps", "is jumping", "plays", "is playing", "sits", "is sitting",
        "stands", "is standing", "walks", "is walking", "rides a bike", "climbs a rock", "swims",
        "is climbing", "looks", "smiles", "catches a ball", "carries a stick"]
PREP = ["on", "in", "through", "across", "near", "under", "over", "by", "along", "into"]
PLACE = ["the grass", "the snow", "a field", "the water", "the beach", "the street", "a park",
         "the sand", "a pool", "the woods", "a wave", "the road", "a fence", "the air", "a mountain"]
ADJ = ["green", "red", "blue", "yellow", "grassy", "snowy", "sandy", "wet", "busy", "rocky"]
EXTRA = ["", "", "", " while another watches", " with a ball in its mouth", " and smiles",
         " , wearing a red shirt", " next to a tree", " in front of a crowd", " at night"]
DECOR = [  # surface variants the tokenizer must undo
    lambda s: s, lambda s: s, lambda s: s,
    lambda s: s[0].upper() + s[1:], lambda s: s + " .", lambda s: s[0].upper() + s[1:] + ".",
    lambda s: s.upper(), lambda s: s + "!", lambda s: s.replace(" is ", "'s ", 1),
    lambda s: s.replace("a dog", "the dog's owner", 1), lambda s: s.replace(" and ", " & ", 1),
    lambda s: s + " ...", lambda s: '"' + s + '"', lambda s: s.replace(" the ", " the ( big ) ", 1),
    lambda s: s.replace("the ", "a black-and-white ", 1), lambda s: s + " , doesn't it ?",
    lambda s: s + " -- it's 3.5 o'clock.", lambda s: "  " + s.replace(" ", "  ") + "  ",
    lambda s: s + " ; the dogs' toys: balls", lambda s: s.replace("a ", "A ", 1) + " at St. Mary's.",
]


def caption(rng, decorate=True):
    place = rng.choice(PLACE)
    if rng.random() < 0.3:
        place = place.replace("the ", "the " + rng.choice(ADJ) + " ", 1).replace("a ", "a " + rng.choice(ADJ) + " ", 1)
    s = f"{rng.choice(SUBJ)} {rng.choice(VERB)} {rng.choice(PREP)} {place}{rng.choice(EXTRA)}"
    if decorate:
        s = rng.choice(DECOR)(s)
    return s


def perturb(rng, s):
    """A hypothesis near a reference: drop, swap or substitute a few words."""
    w = s.split()
    for _ in range(rng.randint(0, 3)):
        op = rng.random()
        if op < 0.35 and len(w) > 2:
            del w[rng.randrange(len(w))]
        elif op < 0.7:
            w[rng.randrange(len(w))] = rng.choice(ADJ + ["dog", "man", "a", "the", "grass"])
        elif len(w) > 3:
            i = rng.randrange(len(w) - 1)
            w[i], w[i + 1] = w[i + 1], w[i]
    return " ".join(w)


def corpus_random(rng, n_img, n_ref_lo, n_ref_hi, near):
    refs, hyps = {}, {}
    for i in range(n_img):
        k = f"img{i:04d}.jpg"
        refs[k] = [caption(rng) for _ in range(rng.randint(n_ref_lo, n_ref_hi))]
        hyps[k] = perturb(rng, rng.choice(refs[k])) if near and rng.random() < 0.8 else caption(rng, rng.random() < 0.3)
    return refs, hyps


def corpus_edge():
    refs = {
        "short": ["a dog runs on the green grass near the trees", "a brown dog is running through a field"],
        "no4gram": ["a man rides a bike down the road", "a biker on a dirt road"],
        "repeat": ["a dog plays with a ball", "the dog plays"],
        "single": ["two children play in the sand at the beach"],
        "emptyish": ["a cat sleeps on a sofa", "a cat is sleeping"],
        "identical": ["a girl in a pink dress jumps into a pool", "a child jumps into the water"],
        "punct": ["A man doesn't want the dog's toy.", "The man's dog can't catch the ball!"],
        "tie": ["one two three", "one two three four five"],
    }
    hyps = {
        "short": "a dog",
        "no4gram": "a man rides a horse down a dirt track",
        "repeat": "a a a dog dog dog plays plays",
        "single": "two kids play on the beach",
        "emptyish": " . ",
        "identical": "a girl in a pink dress jumps into a pool",
        "punct": "a MAN does n't want the dog 's toy",
        "tie": "one two three four",
    }
    return refs, hyps


def corpus_no_unigram():
    refs = {"a": ["a dog runs", "the dog is running"], "b": ["a cat sleeps"]}
    hyps = {"a": "zebra stripes", "b": "purple"}
    return refs, hyps


def ptb(captions):
    """Tokenises a list of captions with pycocoevalcap's PTBTokenizer, keeping order."""
    d = {i: [{"caption": c}] for i, c in enumerate(captions)}
    out = PTBTokenizer().tokenize(d)
    assert len(out) == len(captions), "tokenizer output lines do not match input captions"
    return [out[i][0] for i in range(len(captions))]


def score(refs, hyps):
    ids = list(hyps.keys())
    flat = [c for k in ids for c in refs[k]] + [hyps[k] for k in ids]
    toks = ptb(flat)
    gts, res, pos = {}, {}, 0
    for k in ids:
        gts[k] = toks[pos:pos + len(refs[k])]
        pos += len(refs[k])
    for k in ids:
        res[k] = [toks[pos]]
        pos += 1
    b, _ = Bleu(4).compute_score(gts, res, verbose=0)
    c, _ = Cider().compute_score(gts, res)
    r, _ = Rouge().compute_score(gts, res)
    lr = [[s.split() for s in gts[k]] for k in ids]
    lh = [res[k][0].split() for k in ids]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nl = corpus_bleu(lr, lh, weights=[(1.0,), (0.5, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.25, 0.25, 0.25, 0.25)])
    nl = [float(x) for x in nl]
    return {
        "refs": refs, "hyps": [{"image_id": k, "caption": hyps[k]} for k in ids],
        "refs_tok": gts, "hyps_tok": {k: res[k][0] for k in ids},
        "coco": {"BLEU-1": b[0], "BLEU-2": b[1], "BLEU-3": b[2], "BLEU-4": b[3],
                 "CIDEr-D": float(c), "ROUGE-L": float(r)},
        "nltk": {"BLEU-1": nl[0], "BLEU-2": nl[1], "BLEU-3": nl[2], "BLEU-4": nl[3]},
    }


TOKENIZER_CASES = [
    "A dog doesn't like the cat's toy.", "Two dogs' bowls are RED and blue!",
    "He can't, won't, and shouldn't go; it's 3.5 o'clock.", "A black-and-white dog runs -- fast... very fast?",
    'The man (in a hat) says "hello" to the woman.', "A colour photo of a grey dog in the centre.",
    "They're at Mr. Smith's house on St. Mary St. with the U.S. flag.", "A man and/or a woman & child at 1,000 feet, 50% off, $5.",
    "I'm sure you'll see we've I'd", "'Twas a dog named 'Rex' running", "A    dog  \t with   spaces   ",
    "A dog runs. It is happy. etc.", "a 2-year-old boy in a t-shirt .", "a man with a cigarette's smoke; the kids' toys: balls",
    "\u201cQuoted\u201d text \u2018single\u2019 \u2014 em dash \u2013 en dash \u2026 ellipsis", "Cannot gonna gimme wanna lemme",
    "!!!", "naïve café résumé", "a dog @ the park #1 with *stars* and {braces} [brackets]",
    "5:30pm 10am 5.5m 3.5kg 1,000m 2/3rds", "a dog 5. and 5.5 and .5 and 5.. dog..", "a dog?! wow!? yes!! no?? dog.. dog... dog.... dog.!",
    "dog- -dog dog-- --dog - a -- b --- c", "rock'n'roll '90s y'all dogs'll ain't", "dog,cat dog;cat dog:cat dog!cat dog?cat dog.cat Dog.Cat",
    "he said\"hi\" (dog) [cat] {x} \"dog\" 'dog' ''dog'' ``dog``", "A. B. plan A. vs. e.g. i.e. Dr. Jr. Inc. Co. Ltd. a.m. P.M.",
    "a+b a=b a~b a^b a|b 2/3 1/2 x/y dog/ /cat", "a man's hat. a man 's hat. a MAN'S HAT. DON'T. Don't",
    "it's dog's dogs' ' s", "3rd 1st 21st 2nd 100m 5km 5 km", "shouldn't've D'Artagnan O'Neil",
    "Mt. Everest, Ave. Blvd. Rd. Ft. Gen. Gov. Sen. Rep. Sgt. Capt. Lt. Col.", "the U.K. the U.S.A. a.k.a. No. 5 no. 5 vs vs.",
    "don\u2019t it\u2019s AT&T a&b &amp; x", "MR. DOG. IT'S DON'T THE DOG'S. CANNOT", "No. 5 Ark. 5 ark. 5 Pa. pa. a dog.",
    "plan A. The end. a. no. 5", "a dog sat. a dog jan. a dog Wash. the cat", "wow!! no?! dog.cat a&b AT&T 50% $5",
    "The dog is running.", "A dog is running .", "a dog runs, jumps, and plays.", "Dogs' owners' hats",
    "a man in a red shirt (left) and a woman in blue (right).", "It's a dog's life!", "Two kids.They play.",
    "x -5 -5.5 a-5 5-a -.5 +5 5-5 dog-5 --5 x-.5 (5) .5.5 1.5.5 5,5 ,5 :5 5: 5, 5.5.",
    "x A. The y", "x A. Those y", "x a. The y", "x A. THE y", "x U.S. The y", "x Jr. Bob", "x A. (The y",
    "x A. It y", "x A. Two y", "x B. When y", "x C. Who y", "plan B. Here we go", "x a. dogs",
]


FUZZ_WORDS = ("a the dog dogs man men woman's girl boy's kids' can't don't won't it's they're I'm we've you'll "
              "he'd o'clock black-and-white t-shirt 2 10 3.5 1,000 5:30 St. Mr. Dr. U.S. etc. e.g. A B I x OK "
              "TV USA").split()
FUZZ_PUNCT = list(".,;:!?'\"()-[]&$%/") + ["...", "--", " - ", "!!", "?!", "\u2019", "\u201c", "\u201d"]


def fuzz_caption(rng):
    """Adversarial text: punctuation glued to words, odd casing. Not caption-like; we only require
    that most of these match (the golden test's threshold), the realistic cases must all match."""
    out = []
    for _ in range(rng.randint(3, 14)):
        w = rng.choice(FUZZ_WORDS)
        if rng.random() < 0.3:
            w = w.capitalize()
        if rng.random() < 0.2:
            w = w.upper()
        r = rng.random()
        if r < 0.15:
            w = w + rng.choice(FUZZ_PUNCT)
        elif r < 0.22:
            w = rng.choice(FUZZ_PUNCT) + w
        elif r < 0.27:
            w = w + rng.choice(FUZZ_PUNCT) + rng.choice(FUZZ_WORDS)
        out.append(w)
    return " ".join(out)


def main():
    rng = random.Random(20261122)
    corpora = {}
    corpora["near_hyps_5refs"] = score(*corpus_random(rng, 150, 5, 5, near=True))
    corpora["random_hyps_1to5refs"] = score(*corpus_random(rng, 60, 1, 5, near=False))
    corpora["single_ref"] = score(*corpus_random(rng, 30, 1, 1, near=True))
    corpora["single_image"] = score(*corpus_random(rng, 1, 5, 5, near=True))
    corpora["edge_cases"] = score(*corpus_edge())
    corpora["no_unigram_match"] = score(*corpus_no_unigram())
    r, h = corpus_random(rng, 40, 3, 5, near=True)
    h = {k: " ".join(v.split()[:3]) for k, v in h.items()}  # hypotheses shorter than their references
    corpora["short_hyps"] = score(r, h)
    r, h = corpus_random(rng, 25, 2, 4, near=True)
    corpora["with_edges_mixed"] = score({**r, **corpus_edge()[0]}, {**h, **corpus_edge()[1]})

    cases = TOKENIZER_CASES + [caption(rng) for _ in range(200)]
    toks = ptb(cases)
    fuzz = [fuzz_caption(rng) for _ in range(1000)]
    fuzz_toks = ptb(fuzz)
    data = {
        "generator": "tools/make_metrics_golden.py",
        "corpora": corpora,
        "tokenizer": [[c, t] for c, t in zip(cases, toks)],
        "tokenizer_adversarial": [[c, t] for c, t in zip(fuzz, fuzz_toks)],
    }
    with open(OUT + ".tmp", "w") as f:
        json.dump(data, f, ensure_ascii=False, indent=0, sort_keys=True)
    os.replace(OUT + ".tmp", OUT)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
