"""Evaluation: the paper's benchmark files and scorers, the judge, sampling and rating answers
(annotate), asking one question. May import the core, infra/, speed/ and demo/."""
