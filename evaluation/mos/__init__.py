"""Subjective evaluation: blind MOS rating studies (`lipsync mos create|serve|results`).

study.py builds a balanced, blind study directory; db.py stores ratings in SQLite (WAL); app.py is the
FastAPI rating page; results.py computes MOS, 95 % confidence intervals and rater agreement.
"""
