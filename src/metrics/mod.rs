//! Caption metrics, as the COCO caption evaluation computes them: BLEU-1..4, CIDEr-D, ROUGE-L.
