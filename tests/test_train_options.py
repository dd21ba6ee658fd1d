"""train_imagenet.py's options: flags, --config files, the checks made before any work, and
the configs/ of the paper's recipe table."""
import argparse
import json
import pathlib
import re

import pytest

from utils.training.optimizer import build_schedules, initial_lr
from utils.training.options import (
    OptionError,
    build_parser,
    check_world,
    config_actions,
    parse_options,
    read_config,
)

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"

# The recipe table of docs/SPEC.md: batch -> (epochs, lr0, power, decay start, decay end,
# momentum, damping, mixup alpha)
RECIPE = {
    4096: (36, 8.18e-3, 11, 1, 53, 0.997, 2.5e-4, 0.4),
    8192: (36, 1.25e-2, 8, 1, 53.5, 0.993, 2.5e-4, 0.4),
    16384: (36, 2.5e-2, 8, 1, 53.5, 0.985, 2.5e-4, 0.4),
    32768: (46, 3.0e-2, 3.5, 1.5, 49.5, 0.97, 2.0e-4, 0.6),
    65536: (61, 4.0e-2, 2.9, 2, 64.5, 0.95, 1.5e-4, 0.6),
    131072: (81, 7.0e-2, 3.0, 1, 95, 0.93, 1.0e-4, 1.0),
}


@pytest.fixture(autouse=True)
def in_empty_directory(tmp_path, monkeypatch):
    """parse_options checks the default --out (result/ under the working directory): run in
    an empty one, whatever runs the developer left in the checkout."""
    monkeypatch.chdir(tmp_path)


def write_config(tmp_path, values, name="run.json"):
    path = tmp_path / name
    path.write_text(json.dumps(values))
    return str(path)


def test_config_sets_options_and_flags_override_it(tmp_path):
    path = write_config(tmp_path, {"batchsize": 8, "acc-iters": 2, "lr": 1, "flip": False,
                                   "lr_milestones": [1, 2]})
    options = parse_options(["--config", path, "--lr", "0.5"])
    assert (options.batchsize, options.acc_iters, options.flip) == (8, 2, False)
    assert options.lr == 0.5 and isinstance(options.lr, float)
    assert options.lr_milestones == [1.0, 2.0]
    assert parse_options(["--config", path, "--flip"]).flip is True


def test_unknown_config_keys_are_an_error_listing_the_valid_ones(tmp_path):
    path = write_config(tmp_path, {"batchsize": 8, "bachsize": 8, "lr_warmup": 1})
    with pytest.raises(OptionError) as error:
        parse_options(["--config", path])
    message = str(error.value)
    assert message.startswith(f"{path}: unknown keys 'bachsize', 'lr_warmup'; valid keys: ")
    valid = message.split("valid keys: ")[1].split(", ")
    assert valid == sorted(config_actions(build_parser()))
    assert "acc_iters" in valid and "config" not in valid


@pytest.mark.parametrize("values, message", [
    ({"batchsize": 8.5}, "key 'batchsize' must be an integer, got 8.5"),
    ({"flip": "no"}, "key 'flip' must be true or false, got \"no\""),
    ({"optimizer": "adam"}, "key 'optimizer' must be one of 'kfac', 'sgd', got \"adam\""),
    ({"lr": True}, "key 'lr' must be a number, got true"),
    ({"lr_milestones": 30}, "key 'lr_milestones' must be a non-empty list of numbers, got 30"),
])
def test_config_values_of_the_wrong_type_name_the_file_and_key(tmp_path, values, message):
    path = write_config(tmp_path, values)
    with pytest.raises(OptionError, match="^" + path):
        read_config(path, build_parser())
    with pytest.raises(OptionError) as error:
        read_config(path, build_parser())
    assert str(error.value) == f"{path}: {message}"


def test_bad_config_files_name_the_file_and_position(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"lr": 0.1,\n "epoch": }')
    with pytest.raises(OptionError, match=r"bad.json:2:\d+: not valid JSON"):
        parse_options(["--config", str(bad)])
    with pytest.raises(OptionError, match="missing.json: file not found"):
        parse_options(["--config", str(tmp_path / "missing.json")])
    listed = write_config(tmp_path, [1, 2])
    with pytest.raises(OptionError, match="must hold one JSON object"):
        parse_options(["--config", listed])


def test_every_boolean_flag_can_be_turned_on_and_off():
    parser = build_parser()
    flags = [action for action in parser._actions
             if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                    argparse.BooleanOptionalAction))]
    assert {action.dest for action in flags} == {"flip", "skip_corrupt", "gpu", "overwrite",
                                                 "momentum_scaling", "weight_rescale",
                                                 "progress", "plot", "verify_images",
                                                 "batched_inversion"}
    for action in flags:
        assert isinstance(action, argparse.BooleanOptionalAction), action.option_strings
        on, off = action.option_strings
        assert off == "--no-" + on[2:]
        assert getattr(parser.parse_args([on]), action.dest) is True
        assert getattr(parser.parse_args([off]), action.dest) is False


@pytest.mark.parametrize("argv, message", [
    (["--arch", "resnet99"], "argument --arch: invalid choice: 'resnet99'"),
    (["--train", "/nonexistent/train"], "--train needs --val too"),
    (["--train", "/nonexistent/t", "--val", "/nonexistent/v"],
     "--train /nonexistent/t: no such file or directory"),
    (["--batchsize", "0"], "--batchsize must be at least 1, got 0"),
    (["--epoch", "0"], "--epoch must be positive"),
    (["--insize", "32"], "--insize applies to image files"),
    (["--stat-schedule", "fixed", "--factor-interval", "2", "--inverse-interval", "3"],
     "--inverse-interval (3) must be a multiple of --factor-interval (2)"),
    (["--lr-decay-start", "3", "--epoch", "2"],
     "--lr-decay-end (2) must be after --lr-decay-start (3)"),
    (["--warmup-epochs", "1"], "--warmup-epochs (1) must end by --lr-decay-start (0)"),
    (["--communicator", "nccl"], "--communicator nccl needs --gpu"),
    (["--conv-backend", "cudnn"], "--conv-backend cudnn needs --gpu"),
    (["--factor-dtype", "int8"], "argument --factor-dtype: invalid choice: 'int8'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    # NaN passes every range check, so every number option is checked for it by name
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--damping", "nan"], "--damping must be a finite number, got nan"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
    (["--stale-threshold", "nan"], "--stale-threshold must be a finite number, got nan"),
    (["--mixup-alpha", "nan"], "--mixup-alpha must be a finite number, got nan"),
    (["--lr-milestones", "1", "inf"], "--lr-milestones must be a finite number, got [1.0, "
                                      "inf]"),
])
def test_bad_options_are_clear_errors(argv, message):
    with pytest.raises(OptionError) as error:
        parse_options(argv)
    assert message in str(error.value)


def test_acc_iters_follows_from_the_global_batch_or_must_match_it():
    options = check_world(parse_options(["--batchsize", "32", "--global-batch", "4096"]), 8)
    assert options.acc_iters == 16
    assert check_world(parse_options(["--batchsize", "32"]), 8).acc_iters == 1
    with pytest.raises(OptionError) as error:
        check_world(parse_options(["--batchsize", "32", "--global-batch", "4096",
                                   "--acc-iters", "4"]), 8)
    assert str(error.value) == ("--global-batch 4096 needs workers x batchsize x acc-iters to "
                                "match, got 8 x 32 x 4 = 1024")
    with pytest.raises(OptionError) as error:
        check_world(parse_options(["--batchsize", "48", "--global-batch", "4096"]), 2)
    assert str(error.value).startswith("--global-batch 4096 is not a multiple of workers x "
                                       "batchsize = 2 x 48 = 96")


@pytest.mark.parametrize("batch", sorted(RECIPE))
def test_kfac_configs_are_the_rows_of_the_recipe_table(batch):
    name = f"kfac_{batch // 1024}k.json"
    options = parse_options(["--config", str(CONFIGS / name)])
    epochs, lr, power, start, end, momentum, damping, mixup = RECIPE[batch]
    assert (options.global_batch, options.batchsize) == (batch, 32)
    assert (options.epoch, options.lr, options.lr_power) == (epochs, lr, power)
    assert (options.lr_decay_start, options.lr_decay_end) == (start, end)
    assert (options.momentum, options.damping, options.mixup_alpha) == (momentum, damping, mixup)
    assert options.optimizer == "kfac" and options.arch == "resnet50"
    assert options.weight_rescale and options.momentum_scaling
    # half precision for the factor products and the communication (the paper)
    assert options.comm_dtype == options.factor_dtype == "float16"
    # 32 images per GPU: the table's worker count needs no accumulation, 8 GPUs do
    assert check_world(options, batch // 32).acc_iters == 1
    assert check_world(parse_options(["--config", str(CONFIGS / name)]), 8).acc_iters == \
        batch // 256
    schedules = build_schedules(options, batch // 32)
    assert schedules.schedules["lr"](start) == pytest.approx(lr)
    assert schedules.schedules["lr"]((start + end) / 2) == pytest.approx(lr * 0.5 ** power)
    assert schedules.schedules["momentum"]((start + end) / 2) == pytest.approx(
        momentum * 0.5 ** power)


def test_sgd_baseline_config_is_goyal_et_al():
    options = check_world(parse_options(["--config", str(CONFIGS / "sgd_goyal_8k.json")]), 256)
    assert initial_lr(options, 256) == pytest.approx(0.1 * 8192 / 256)
    lr = build_schedules(options, 256).schedules["lr"]
    assert lr(0) == pytest.approx(0.1)  # the warm-up starts from 0.1 per 256 images
    assert lr(5) == pytest.approx(3.2)
    assert [lr(e) for e in (29.9, 30, 60, 80)] == pytest.approx([3.2, 0.32, 0.032, 0.0032])
    assert options.epoch == 90 and options.weight_decay == 1e-4
    assert not options.weight_rescale and not options.momentum_scaling


def test_every_config_file_parses():
    names = sorted(path.name for path in CONFIGS.glob("*.json"))
    assert names == sorted([f"kfac_{b // 1024}k.json" for b in RECIPE] + ["sgd_goyal_8k.json"])
    for name in names:
        read_config(str(CONFIGS / name), build_parser())


def test_every_number_option_rejects_nan():
    for action in config_actions(build_parser()).values():
        if action.type is float:
            flag = action.option_strings[0]
            values = ["1", "nan"] if action.nargs == "+" else ["nan"]
            with pytest.raises(OptionError, match=f"{flag} must be a finite number"):
                parse_options([flag, *values])


def test_a_config_file_with_nan_names_the_file_and_key(tmp_path):
    path = tmp_path / "nan.json"
    path.write_text('{"damping": NaN}')
    with pytest.raises(OptionError, match=f"{path}: key 'damping' must be a finite number"):
        parse_options(["--config", str(path)])


def test_out_is_checked_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OptionError, match=r"--out .*file: is a file, not a directory"):
        parse_options(["--out", str(tmp_path / "file")])
    with pytest.raises(OptionError, match=r"--out /proc/kfac_out: cannot write in /proc"):
        parse_options(["--out", "/proc/kfac_out"])
    run = tmp_path / "run"
    run.mkdir()
    parse_options(["--out", str(run)])  # an empty directory is fine
    (run / "log.jsonl").write_text("{}\n")
    (run / "snapshot_iter_000010").mkdir()
    with pytest.raises(OptionError) as error:
        parse_options(["--out", str(run)])
    assert str(error.value) == (
        f"--out {run} already holds a run (log.jsonl, snapshot_iter_000010); continue it with "
        f"--resume {run}, choose another --out, or pass --overwrite to start a new run there")
    assert (run / "log.jsonl").read_text() == "{}\n"  # nothing touched
    assert parse_options(["--out", str(run), "--overwrite"]).overwrite
    assert parse_options(["--out", str(run), "--resume", str(run)]).resume == str(run)


def test_help_explains_every_flag_and_names_each_default_once():
    text = build_parser().format_help()
    entries = re.split(r"\n(?=  -)", text.split("\n\n", 1)[1])[1:]
    entries = [entry.split("\n\n")[0] for entry in entries]  # up to a group's title
    assert len(entries) > 60
    for entry in entries:
        name = entry.split()[0]
        description = " ".join(entry.split("\n", 1)[-1].split()) if "\n" in entry else ""
        assert description or len(entry.split("  ")) > 2, f"{name} has no help"
        assert entry.count("default:") <= 1, entry
    for flag, shown in (("--optimizer", "(default: kfac)"), ("--momentum", "(default: 0.9)"),
                        ("--comm-alpha", "default: 2e-06"), ("--keep-snapshots", "(default: 2)")):
        entry = next(e for e in entries if e.lstrip().startswith(flag))
        assert shown in " ".join(entry.split()), entry
