"""The run report: per-level and per-layer tables, PNG plots (matplotlib, Agg) and compute totals from a run folder.

``build_report(run_dir)`` writes ``report.md``, ``report.json`` and ``plots/`` and returns the path of report.md; it
works on interrupted runs. ``LevelTable`` prints the per-level table while a run trains. ``log_report`` sends the
table and totals to every configured Composer logger.
"""
from composer_imp.report.build import REPORT_FILE, build_report, load_run, log_report
from composer_imp.report.tables import level_rows

__all__ = ['build_report', 'load_run', 'log_report', 'level_rows', 'REPORT_FILE', 'LevelTable']


def __getattr__(name):  # LevelTable imports Composer (~4 s): only when asked for
    if name == 'LevelTable':
        from composer_imp.report.live import LevelTable

        return LevelTable
    raise AttributeError(name)
