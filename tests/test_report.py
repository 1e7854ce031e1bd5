"""The run report from a run folder's files: level table, matching, per-layer densities, plots, totals, loggers."""
import json
import os

import pytest
import yaml

from composer_imp.report import build_report, level_rows, log_report
from composer_imp.report.tables import console_header, console_row

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
ACC = 'eval/MulticlassAccuracy'


def record(level, density, acc, barrier=None, matching=None, accepted=True, fraction=None, adaptive=False):
    r = {
        'level': level, 'density': density, 'nominal_density': density,
        'layer_density': {'module.fc1.weight': density * 0.9, 'module.fc.weight': min(1.0, density * 1.5)},
        'eval': {ACC: acc, 'eval/CrossEntropy': 1 - acc}, 'steps': 100 if level == 0 else 90,
        'samples': 6400, 'flops': 1e9 * density, 'seconds': 2.0, 'start_batch': 0, 'end_batch': 100,
        'stopped_early': False, 'accepted': accepted,
    }
    if level > 0:
        r['step'] = {'fraction': fraction or 0.2}
        if adaptive:
            r['step'].update(reason='projection', cost={'samples': 64, 'flops': 1e6, 'seconds': 0.1})
            r['verify'] = {'outcome': 'passed' if accepted else 'backoff', 'cost': {'samples': 32, 'flops': 5e5,
                                                                                     'seconds': 0.05}}
    if barrier is not None:
        r['lmc/barrier'] = barrier
        r['lmc/barrier_max_minus_mean'] = barrier + 0.01
        r['lmc/connected'] = barrier <= 0.02
        r['lmc/metric'] = 'error'
        r['lmc/curve'] = {'alphas': [0, 0.5, 1], 'error': [1 - acc, 1 - acc + barrier, 1 - acc], 'loss': [1, 1, 1]}
    if matching is not None:
        r['imp/matching'] = matching
    return r


FIXED = [
    record(0, 1.0, 0.950),
    record(1, 0.8, 0.955, barrier=0.0, matching=True),
    record(2, 0.64, 0.951, barrier=0.004, matching=True),
    record(3, 0.512, 0.930, barrier=0.05, matching=False),
]
ADAPTIVE = [
    record(0, 1.0, 0.950),
    record(1, 0.5, 0.952, fraction=0.5, adaptive=True),
    record(2, 0.2, 0.900, fraction=0.6, adaptive=True, accepted=False),
    record(2, 0.3, 0.949, fraction=0.4, adaptive=True),
    record(3, 0.24, 0.948, fraction=0.2, adaptive=True),
]


def make_run(tmp_path, records, recipe=None, info=None, name='run'):
    run = tmp_path / name
    (run / 'imp').mkdir(parents=True)
    with open(run / 'imp' / 'levels.jsonl', 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)
    if recipe is not None:
        (run / 'recipe.yaml').write_text(yaml.safe_dump(recipe))
    if info is not None:
        (run / 'run.json').write_text(json.dumps(info))
    return str(run)


FIXED_RECIPE = {'run_name': 'fixed', 'seed': 1, 'max_duration': '4ep', 'model': {'name': 'lenet_300_100'},
                'train_loader': {'name': 'mnist-5k'}, 'algorithms': {'imp': {'levels': 3, 'rewind_to': '10ba'}},
                'callbacks': {'lmc_evaluator': {'threshold': 0.02, 'matching_tolerance': 0.002}}}


def png_ok(path):
    with open(path, 'rb') as f:
        return f.read(8) == PNG_MAGIC and os.path.getsize(path) > 5000


def test_the_level_table_shows_density_accuracy_matching_barrier_and_compute(tmp_path):
    run = make_run(tmp_path, FIXED, FIXED_RECIPE, {'status': 'complete', 'hardware': 'CPU (2 cores)',
                                                   'versions': {'torch': '2.7.0'}, 'wall_seconds': 42.0})
    report = open(build_report(run)).read()
    assert '| level | density | test acc | vs dense | matching | barrier | connected | pruned by | steps | seconds ' \
           '| GFLOPs | status |' in report
    assert '| 2 | 64.00% | 95.10% | +0.10 pp | yes | 0.40 pp | yes | 20.0% | 90 | 2.0 | 0.64 | accepted |' in report
    assert '| 3 | 51.20% | 93.00% | -2.00 pp | no | 5.00 pp | no |' in report
    assert '**Sparsest matching level: 2 at 64% density**' in report
    assert 'First non-matching level: 3 at 51.2% density.' in report
    assert 'complete: 4 of 4 planned levels.' in report and 'CPU (2 cores)' in report and '42.0 s' in report


def test_the_per_layer_density_table_has_one_column_per_level(tmp_path):
    report = open(build_report(make_run(tmp_path, FIXED, FIXED_RECIPE))).read()
    assert '| layer | L0 | L1 | L2 | L3 |' in report
    assert '| `module.fc1.weight` | 90.0% | 72.0% | 57.6% | 46.1% |' in report
    assert '| **all prunable** | 100.0% | 80.0% | 64.0% | 51.2% |' in report


def test_the_plots_exist_whenever_their_data_does(tmp_path):
    run = make_run(tmp_path, FIXED, FIXED_RECIPE)
    build_report(run)
    plots = sorted(os.listdir(os.path.join(run, 'plots')))
    assert plots == ['accuracy_vs_density.png', 'barrier_per_level.png', 'interpolation_paths.png']
    assert all(png_ok(os.path.join(run, 'plots', p)) for p in plots)


def test_a_run_without_lmc_gets_no_barrier_plots_and_a_hint(tmp_path):
    records = [{k: v for k, v in r.items() if not k.startswith('lmc/') and k != 'imp/matching'} for r in FIXED]
    run = make_run(tmp_path, records, {**FIXED_RECIPE, 'callbacks': {}})
    report = open(build_report(run)).read()
    assert os.listdir(os.path.join(run, 'plots')) == ['accuracy_vs_density.png']
    assert 'add `callbacks: {lmc_evaluator: {}}`' in report
    # Matching then comes from the accuracies and the default tolerance of 0.2 points.
    assert [r['matching'] for r in level_rows(records)] == [None, True, True, False]


def test_an_adaptive_run_marks_rejected_attempts_and_plots_the_chosen_fractions(tmp_path):
    recipe = {**FIXED_RECIPE, 'algorithms': {'imp': {'target_density': 0.25},
                                             'adaptive_sparsity_step': {'p_min': 0.2}}}
    run = make_run(tmp_path, ADAPTIVE, recipe)
    report = open(build_report(run)).read()
    assert png_ok(os.path.join(run, 'plots', 'adaptive_fraction.png'))
    assert '(plots/adaptive_fraction.png)' in report
    assert '| ~~2~~ | ~~20.00%~~ |' in report and 'rejected (back-off)' in report
    assert '60.0% (projection)' in report
    assert '| 5 | 4 | 1 | 460 |' in report  # trainings, accepted, rejected, steps
    assert 'this run trained 5 times (1 rejected) in 460 steps: 37.0% fewer training steps' in report
    assert 'A fixed 20% step needs 7 pruned levels to reach 24% density (8 trainings, 730 steps)' in report
    assert 'complete: 4 levels, density 24%' in report


def test_a_fixed_run_gets_no_adaptive_plot(tmp_path):
    run = make_run(tmp_path, FIXED, FIXED_RECIPE)
    build_report(run)
    assert not os.path.exists(os.path.join(run, 'plots', 'adaptive_fraction.png'))


def test_an_interrupted_run_reports_what_finished_and_drops_stale_plots(tmp_path):
    run = make_run(tmp_path, FIXED, FIXED_RECIPE)
    build_report(run)
    with open(os.path.join(run, 'imp', 'levels.jsonl'), 'w') as f:
        f.write(json.dumps(FIXED[0]) + '\n{"level": 1, "torn')
    report = open(build_report(run)).read()
    assert 'interrupted (stopped): 1 of 4 planned levels finished.' in report
    assert os.listdir(os.path.join(run, 'plots')) == ['accuracy_vs_density.png']


def test_a_run_killed_before_its_first_level_still_gets_a_report(tmp_path):
    run = make_run(tmp_path, [], FIXED_RECIPE, {'status': 'running'})
    report = open(build_report(run)).read()
    assert '_No level has finished yet._' in report and 'interrupted or still running: 0 of 4' in report


def test_instability_results_are_added_to_the_report(tmp_path):
    run = make_run(tmp_path, FIXED, FIXED_RECIPE)
    os.makedirs(os.path.join(run, 'imp', 'level_2'))
    result = {'level': 2, 'density': 0.64, 'seeds': [1, 2], 'metric': 'error', 'alphas': [0, 0.5, 1],
              'values': {'error': [0.05, 0.08, 0.051], 'loss': [0.2, 0.3, 0.2]}, 'barrier_linear': 0.0295,
              'barrier_max_minus_mean': 0.0295, 'threshold': 0.02, 'stable': False, 'bn': 'interpolate'}
    with open(os.path.join(run, 'imp', 'level_2', 'instability_seeds_1_2.json'), 'w') as f:
        json.dump(result, f)
    report = open(build_report(run)).read()
    assert '## Instability analysis' in report
    assert '| 2 | 64% | 1, 2 | 2.95 pp | 2.95 pp | 2 pp | no | 5.00%, 5.10% |' in report
    assert png_ok(os.path.join(run, 'plots', 'instability_level_2_seeds_1_2.png'))


def test_build_report_rejects_a_missing_folder(tmp_path):
    with pytest.raises(ValueError, match='run_dir'):
        build_report(str(tmp_path / 'missing'))


def test_the_console_rows_line_up_with_the_header():
    rows = level_rows(FIXED)
    header, line = console_header(), console_row(rows[2])
    assert header.index('density') + len('density') == line.index('64.00%') + len('64.00%')
    assert line.split()[:5] == ['2', '64.00%', '95.10%', '+0.10', 'pp']


class RecordingLogger:
    def __init__(self):
        self.tables, self.metrics = {}, {}

    def log_table(self, columns, rows, name='Table', step=None):
        self.tables[name] = (columns, rows)

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)


def test_the_table_and_totals_go_to_every_logger():
    logger = RecordingLogger()
    log_report(logger, FIXED)
    columns, rows = logger.tables['imp/levels']
    assert columns[:3] == ['level', 'density', 'test acc'] and len(rows) == 4 and rows[2][1] == '64.00%'
    assert logger.metrics['imp/total/levels'] == 4 and logger.metrics['imp/total/steps'] == 370
    assert logger.metrics['imp/sparsest_matching_density'] == 0.64


def test_a_barrier_on_the_loss_is_shown_in_its_own_units_not_in_points():
    loss_run = [dict(r, **{'lmc/metric': 'loss'}) for r in FIXED]
    error_row, loss_row = console_row(level_rows(FIXED)[3]), console_row(level_rows(loss_run)[3])
    assert '5.00 pp' in error_row and '5.00 pp' not in loss_row and '0.05 loss' in loss_row


# ---------------------------------------------------------------- what a user sees: uncertainty, plots, progress

def test_the_level_table_gives_a_95_percent_interval_and_says_what_n_test_samples_resolve(tmp_path):
    from composer_imp.report.tables import wilson_interval

    low, high = wilson_interval(0.95, 1000)
    assert (round(low, 4), round(high, 4)) == (0.9347, 0.9619)  # Wilson score interval, z = 1.96
    assert level_rows(FIXED, eval_samples=1000)[2]['accuracy_ci'] == wilson_interval(0.951, 1000)
    recipe = {**FIXED_RECIPE, 'eval_loader': {'name': 'mnist-5k', 'batch_size': 500}}
    report = open(build_report(make_run(tmp_path, FIXED, recipe))).read()
    assert '| level | density | test acc [95% CI] | vs dense |' in report
    assert '| 2 | 64.00% | 95.10% [93.6, 96.3] | +0.10 pp | yes |' in report
    assert 'n = 1,000 samples' in report and 'steps of 0.1 pp' in report and '±0.7 pp' in report
    assert 'less than about 1.9 pp are not resolved' in report
    # A record carrying its own sample count wins over the recipe's data set.
    assert level_rows([dict(FIXED[0], eval_samples=10000)], eval_samples=1000)[0]['eval_samples'] == 10000


def test_without_a_known_eval_sample_count_the_report_says_it_cannot_give_an_interval(tmp_path):
    report = open(build_report(make_run(tmp_path, FIXED, FIXED_RECIPE))).read()
    assert '| level | density | test acc | vs dense |' in report and '[95% CI]' not in report
    assert 'cannot give a confidence interval' in report


def _capture(monkeypatch):
    """Run a plot function and keep its figure (drawn) instead of only the file."""
    from composer_imp.report import plots

    figures = []
    original = plots._save

    def save(fig, path):
        figures.append(fig)
        result = original(fig, path)  # tight layout, as in the files
        fig.canvas.draw()
        return result

    monkeypatch.setattr(plots, '_save', save)
    return plots, figures, original


def _legend_is_outside(fig):
    ax = fig.axes[0]
    legend = ax.get_legend()
    return legend is not None and legend.get_window_extent().x0 >= ax.get_window_extent().x1 - 1


def test_a_zero_barrier_gets_a_visible_marker_in_its_colour_and_legends_sit_outside(tmp_path, monkeypatch):
    plots, figures, _ = _capture(monkeypatch)
    rows = level_rows(FIXED)  # level 1: barrier 0.0, matching (green)
    plots.barrier_per_level(rows, str(tmp_path / 'b.png'), 0.02)
    plots.accuracy_vs_density(rows, str(tmp_path / 'a.png'), 0.01)
    plots.interpolation_paths(FIXED, str(tmp_path / 'p.png'))
    barrier = figures[0]
    markers = [c for c in barrier.axes[0].collections if len(c.get_offsets())]
    assert len(markers) == 1 and [tuple(o) for o in markers[0].get_offsets()] == [(0.0, 0.0)]
    import matplotlib.colors as mcolors
    assert tuple(markers[0].get_facecolors()[0][:3]) == mcolors.to_rgb('tab:green')
    assert barrier.axes[0].get_ylim()[0] < 0  # the marker is not cut in half by the axis
    assert all(_legend_is_outside(f) for f in figures)
    labels = [t.get_text() for t in barrier.axes[0].get_legend().get_texts()]
    assert 'matching unknown' not in labels and any('≈ 0' in t for t in labels)


def test_the_adaptive_plot_says_red_is_rejected_only_when_a_level_was_rejected(tmp_path, monkeypatch):
    plots, figures, _ = _capture(monkeypatch)
    plots.adaptive_fractions(level_rows(ADAPTIVE), str(tmp_path / 'with.png'), 0.2)
    plots.adaptive_fractions(level_rows([r for r in ADAPTIVE if r['accepted']]), str(tmp_path / 'without.png'), 0.2)
    assert '(red: rejected)' in figures[0].axes[0].get_title()
    assert 'red' not in figures[1].axes[0].get_title()
    caption = open(build_report(make_run(tmp_path, [r for r in ADAPTIVE if r['accepted']],
                                         {**FIXED_RECIPE, 'algorithms': {'imp': {'target_density': 0.25},
                                                                         'adaptive_sparsity_step': {}}}))).read()
    assert 'red: rejected' not in caption and 'red crosses' not in caption


def test_the_instability_title_names_the_barrier_it_quotes_and_gives_the_linear_one(tmp_path, monkeypatch):
    from composer_imp.functional import barrier_linear, barrier_max_minus_mean

    plots, figures, _ = _capture(monkeypatch)
    alphas, errors = [0, 0.5, 1], [0.02, 0.0253, 0.03]  # unequal endpoints, a path just above the chord
    result = {'level': 2, 'seeds': [1, 2], 'metric': 'error', 'alphas': alphas,
              'values': {'error': errors}, 'barrier_linear': barrier_linear(alphas, errors),
              'barrier_max_minus_mean': barrier_max_minus_mean(alphas, errors), 'threshold': 0.02, 'stable': True}
    plots.instability_curve(result, str(tmp_path / 'i.png'))
    title = figures[0].axes[0].get_title()
    assert 'barrier (max − mean) 0.50 pp, stable' in title  # the convention the verdict uses
    assert 'linear barrier (above the chord) 0.03 pp' in title
    assert _legend_is_outside(figures[0])


def test_the_level_table_prints_plain_progress_lines_within_each_level(tmp_path):
    import io

    import torch
    from composer import Trainer

    from composer_imp import IMP
    from composer_imp.report.live import LevelTable
    from helpers import digits_loader, mlp

    stream = io.StringIO()
    model = mlp()
    table = LevelTable(stream=stream, progress_every_seconds=None, progress_every_steps=2)
    imp = IMP(levels=2, rewind_to='2ba', folder=str(tmp_path / 'imp'))
    trainer = Trainer(model=model, train_dataloader=digits_loader(), max_duration='8ba',
                      optimizers=torch.optim.SGD(model.parameters(), lr=0.1), algorithms=[imp], callbacks=[table],
                      progress_bar=False, seed=7, device='cpu')
    trainer.fit()
    trainer.close()
    out = stream.getvalue()
    assert '\r' not in out
    progress = [line for line in out.splitlines() if line.startswith('[imp] ')]
    by_level = {level: [line for line in progress if line.startswith(f'[imp] level {level}/2 ')] for level in range(3)}
    assert all(by_level.values()), out
    assert all('step ' in line and '/8 of the level' in line for line in by_level[0])  # level 0: batch of T
    assert all('/6 of the level' in line for line in by_level[1] + by_level[2])  # pruned: batch - k of T - k
    assert all('level ETA ' in line for line in progress)
    assert 'density 100.00%' in by_level[0][0] and 'density 80.0' in by_level[1][0]
    # The level table itself still prints, once per level.
    lines = out.splitlines()
    assert lines.count(console_header()) == 1
    assert [line.split()[0] for line in lines if not line.startswith('[imp] ') and line != console_header()] == \
        ['0', '1', '2']
