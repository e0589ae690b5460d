"""
Mutation score of the optimizer (sophia.py) and of what Sophia-G adds to the training loop
(optimizers.py's SophiaGRecipe: the Hessian pass, its schedule, the optimizer it builds), with mutmut: each
mutant is a copy of one function with one small change (an operator, a constant, an argument
dropped), and the tests that reach that function run against it. A mutant is killed when a test
fails, and survives otherwise; the score is the share killed. Not part of CI: it takes about half
an hour on 2 cores (20 minutes for mutmut's run, 6 for --recheck).

    $ pip install mutmut
    $ python mutation_score.py --recheck          # runs what is not yet done, then reports
    $ python mutation_score.py --report_only      # the report of what has run
    $ python mutation_score.py 'optimizers.xǁSophiaGRecipeǁhessian_due__mutmut_*'   # some of the mutants only
    $ mutmut show 'sophia.x_sample_labels__mutmut_15'    # one mutant's change

mutmut works in a copy of the repository under mutants/ (ignored by git) and keeps its results
there, so an interrupted run goes on where it stopped; the tests it runs per mutant are the fast
selection in pyproject.toml's [tool.mutmut] (test_sophia.py, test_hessian.py, test_faults.py's
non-finite cases), and among them those that reach the mutated function (measured by mutmut in
this process: tests that start the training scripts in a subprocess do not count as reaching it).
--recheck then runs the survivors of the Hessian pass's functions and of the sharding helper
against the multi-process tests that can see them (END_TO_END below); --report_only skips mutmut's
run and, with --recheck, only rechecks.
"""

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.abspath(__file__))
# what is mutated: every function of sophia.py, and what Sophia-G adds to the loop in optimizers.py
# (the rest of the loop is shared with the other optimizers and checked by the end-to-end tests)
TARGETS = ['sophia.*'] + [f'optimizers.x_{name}__mutmut_*' for name in (
    'gnb_hessian_pass', 'hutchinson_hessian_pass', 'sampled_loss')] + [
    f'optimizers.xǁSophiaGRecipeǁ{name}__mutmut_*' for name in (
        'hessian_pass', 'hessian_due', 'after_step', 'build', 'step', '__init__', 'diagnostics')]
# functions whose mutants mutmut cannot measure, left out of the score: mutmut imports the code
# once and forks a process per mutant, and these run once per process before that fork
NOT_MEASURABLE = {
    'sophia._build_cpu_kernels': 'compiles and loads the C++ kernels at the first step and caches them '
                                 'in the process, so a mutant of it never runs; the kernels it builds '
                                 'are held bit for bit to the reference by test_sophia.py',
}
# End-to-end tests that start the training scripts in subprocesses (torchrun, 2 processes): mutmut
# cannot tell that they reach a function, so it never runs them against its mutants, and what only
# a multi-process run can see (a Hessian pass whose gradients are not summed over the processes,
# another process's share of the data, FSDP's shards) survives its selection. --recheck runs each
# surviving mutant of these functions against these tests: the scripts they start inherit the
# MUTANT_UNDER_TEST variable that selects the mutant.
TWO_PROCESSES = 'tests/test_hessian.py::test_two_processes_hold_the_state_one_process_holds'
END_TO_END = {
    'optimizers.gnb_hessian_pass': [TWO_PROCESSES + '[gnb]'],
    'optimizers.SophiaGRecipe.hessian_pass': [TWO_PROCESSES + '[gnb]'],
    'optimizers.hutchinson_hessian_pass': [TWO_PROCESSES + '[hutchinson]'],
    'sophia._local': ['tests/test_fsdp.py::test_fsdp_trains_as_ddp_does'],
}
# {mutant: [status, sha256 of the mutated module's file in mutants/ when it was rechecked]}: an entry
# made before mutmut regenerated that file (the source changed) no longer counts
RECHECKED = os.path.join(ROOT, 'mutants', 'end_to_end.json')
# mutmut's exit codes of a mutant's test run (mutmut.stats.status_by_exit_code)
KILLED, SURVIVED = 'killed', 'survived'

def function_of(mutant):
    return re.sub(r'__mutmut_\d+$', '', mutant).replace('ǁ', '.').replace('.x_', '.').replace('.x.', '.')

def results(patterns):
    """{mutant name: status} of the mutants matching `patterns` that have run."""
    from mutmut.stats import status_by_exit_code
    import fnmatch
    found = {}
    for path in glob.glob(os.path.join(ROOT, 'mutants', '*.py.meta')):
        with open(path) as f:
            exit_codes = json.load(f)['exit_code_by_key']
        for mutant, code in exit_codes.items():
            if (code is not None and any(fnmatch.fnmatch(mutant, pattern) for pattern in patterns)
                    and function_of(mutant) not in NOT_MEASURABLE):
                found[mutant] = status_by_exit_code[code]
    return found

def module_digest(mutant):
    with open(os.path.join(ROOT, 'mutants', mutant.split('.')[0] + '.py'), 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()

def rechecked():
    """{mutant: status} of the rechecks still valid for the current mutants."""
    if not os.path.exists(RECHECKED):
        return {}
    with open(RECHECKED) as f:
        entries = json.load(f)
    return {m: status for m, (status, digest) in entries.items() if digest == module_digest(m)}

def recheck(found):
    """Run the surviving mutants of END_TO_END's functions against its tests; record the outcome."""
    done = {m: [status, module_digest(m)] for m, status in rechecked().items()}
    todo = sorted(m for m, status in found.items()
                  if status == SURVIVED and function_of(m) in END_TO_END and m not in done)
    for n, mutant in enumerate(todo):
        env = dict(os.environ, MUTANT_UNDER_TEST=mutant, PYTHONUNBUFFERED='1')
        tests = END_TO_END[function_of(mutant)]
        result = subprocess.run([sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:warnings', *tests],
                                cwd=os.path.join(ROOT, 'mutants'), env=env, capture_output=True, text=True)
        if result.returncode not in (0, 1):  # 1: a test failed; anything else: the run itself broke
            raise SystemExit(f"error: pytest exited with status {result.returncode} for {mutant}:\n"
                             + result.stdout[-2000:])
        done[mutant] = [KILLED if result.returncode == 1 else SURVIVED, module_digest(mutant)]
        print(f"{n + 1}/{len(todo)} {mutant}: {done[mutant][0]} end to end", flush=True)
        with open(RECHECKED + '.tmp', 'w') as f:
            json.dump(done, f, indent=1)
        os.replace(RECHECKED + '.tmp', RECHECKED)

def report(found):
    """The score, per function and overall, and the surviving mutants' changes."""
    valid = rechecked()
    end_to_end = {m for m, status in found.items() if status == SURVIVED and valid.get(m) == KILLED}
    found = {m: KILLED if m in end_to_end else status for m, status in found.items()}
    counts = Counter(found.values())
    decided = counts[KILLED] + counts[SURVIVED] + counts['timeout']
    score = (counts[KILLED] + counts['timeout']) / decided if decided else float('nan')
    print(f"mutation score: {score:.1%} ({counts[KILLED]} killed, {counts['timeout']} timed out, "
          f"{counts[SURVIVED]} survived; {sum(counts.values()) - decided} neither: {dict(counts)})")
    print(f"killed: {counts[KILLED] - len(end_to_end)} by mutmut's selection, {len(end_to_end)} more by the "
          f"end-to-end tests that only --recheck runs against them")
    by_function = {}
    for mutant, status in found.items():
        by_function.setdefault(function_of(mutant), Counter())[status] += 1
    print(f"\n| function | mutants | killed | survived |\n|---|---|---|---|")
    for function, c in sorted(by_function.items()):
        print(f"| `{function}` | {sum(c.values())} | {c[KILLED] + c['timeout']} | {c[SURVIVED]} |")
    for function, why in NOT_MEASURABLE.items():
        print(f"\nnot counted: `{function}`, which {why}")
    survivors = sorted(mutant for mutant, status in found.items() if status == SURVIVED)
    if survivors:
        print(f"\nsurviving mutants ({len(survivors)}):")
    for mutant in survivors:
        shown = subprocess.run(['mutmut', 'show', mutant], capture_output=True, text=True, cwd=ROOT).stdout
        changed = [line for line in shown.splitlines() if line[:2] in ('- ', '+ ')]
        print(f"  {mutant}")
        for line in changed:
            print(f"      {line}")

def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--report_only', action='store_true', help="no mutmut run: report what has run (with --recheck, recheck first)")
    parser.add_argument('--recheck', action='store_true',
                        help="then run the survivors of END_TO_END's functions against its multi-process tests")
    parser.add_argument('patterns', nargs='*', default=TARGETS, help='mutant names (globs) to run and report')
    args = parser.parse_args()
    if shutil.which('mutmut') is None:
        parser.exit(2, "error: mutmut is not installed; pip install mutmut\n")
    if not args.report_only:
        # one thread per test process: mutmut runs mutants side by side, and libgomp's thread
        # pool does not survive the fork mutmut starts each mutant with
        env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
        status = subprocess.run(['mutmut', 'run'] + args.patterns, cwd=ROOT, env=env).returncode
        if status != 0:
            parser.exit(status, f"error: mutmut run exited with status {status}\n")
    if args.recheck:
        recheck(results(args.patterns))
    report(results(args.patterns))

if __name__ == '__main__':
    sys.exit(main())
