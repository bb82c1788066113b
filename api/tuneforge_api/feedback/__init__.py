"""Human-feedback sessions: the rules behind ``routes/feedback.py`` and ``store/feedback.py``.

``ingest`` turns a finished sample job into items and answers, ``labels`` checks a ranking and
orders answers for a labeler, ``agreement`` measures inter-labeler agreement (Kendall's tau-b),
and ``export`` writes the rankings file a reward_model job trains on.
"""
