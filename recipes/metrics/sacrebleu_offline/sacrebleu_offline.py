"""sacreBLEU and chrF as one ``evaluate`` metric that loads offline.

``evaluate.load("sacrebleu")`` fetches its script from the Hub; this module ships with the recipes and is loaded
with ``evaluate.load("recipes/metrics/sacrebleu_offline")``. It computes corpus-level BLEU and chrF with the
installed ``sacrebleu`` package (default tokenisation "13a", as the Hub metric does).

Example:

```python
>>> import evaluate
>>> metric = evaluate.load("recipes/metrics/sacrebleu_offline")
>>> round(metric.compute(predictions=["Die Zahl ist drei."], references=[["Die Zahl ist drei."]])["bleu"], 1)
100.0
```
"""

# evaluate copies this script into its module cache and parses its imports line by line: one import per line
import datasets
import evaluate
import sacrebleu


_CITATION = """\
@inproceedings{post-2018-call,
    title = "A Call for Clarity in Reporting {BLEU} Scores",
    author = "Post, Matt",
    booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
    year = "2018",
    pages = "186--191",
}
"""

_DESCRIPTION = "Corpus BLEU and chrF computed with sacrebleu, packaged to load without the Hugging Face Hub."

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of translated sentences (str).
    references: list of lists of reference sentences, one inner list per prediction (all of equal length).
    tokenize: sacrebleu tokenizer for BLEU ("13a" by default).
Returns:
    bleu: corpus BLEU (0-100); chrf: corpus chrF (0-100); precisions: the four n-gram precisions;
    brevity_penalty; sys_len; ref_len.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SacrebleuOffline(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(self, predictions, references, tokenize="13a"):
        if not references:
            raise ValueError("sacrebleu_offline: no references given")
        counts = {len(refs) for refs in references}
        if len(counts) != 1:
            raise ValueError(f"sacrebleu_offline: every prediction needs the same number of references, got {counts}")
        # sacrebleu wants one stream per reference position: [[ref0 of every sentence], [ref1 ...], ...]
        streams = [[refs[i] for refs in references] for i in range(counts.pop())]
        bleu = sacrebleu.corpus_bleu(predictions, streams, tokenize=tokenize)
        chrf = sacrebleu.corpus_chrf(predictions, streams)
        return {
            "bleu": bleu.score,
            "chrf": chrf.score,
            "precisions": list(bleu.precisions),
            "brevity_penalty": bleu.bp,
            "sys_len": bleu.sys_len,
            "ref_len": bleu.ref_len,
        }
