//! `lora-kernels`: merge PEFT adapters into checkpoints, inspect adapters, plan LoRA memory.
//! `lora-kernels --help` (or `lora-kernels help <command>`) documents every option.
//!
//! Usage errors print one line and exit with status 2; other errors print one line and exit with 1.
//! A failed merge leaves no output and never touches the base.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{HumanBytes, HumanDuration, ProgressBar, ProgressStyle};

use lora_kernels::Device;
use lora_kernels::checkpoint::{
    MergeOptions, MergeSummary, Progress, VerifySummary, merge_checkpoint_with, verify_merge,
};
use lora_kernels::memory::{self, ModelConfig, full_finetune, lora_finetune};
use lora_kernels::peft::PeftAdapter;

/// `--version`: the version and whether the kernels were compiled for CUDA (`-V`: the version).
const LONG_VERSION: &str = if lora_kernels::kernel::cuda_compiled() {
    concat!(
        env!("CARGO_PKG_VERSION"),
        "\nCUDA kernels: compiled by nvcc (a GPU is used when one is found)"
    )
} else {
    concat!(
        env!("CARGO_PKG_VERSION"),
        "\nCUDA kernels: not compiled (built without nvcc), kernels run on the CPU emulator"
    )
};

/// LoRA kernels from the command line: merge a PEFT adapter into a safetensors checkpoint (or take it
/// back out), list an adapter's modules, plan LoRA training memory.
#[derive(Parser)]
#[command(name = "lora-kernels", version, long_version = LONG_VERSION, arg_required_else_help = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Merge(MergeArgs),
    Inspect(InspectArgs),
    Plan(PlanArgs),
}

/// Merge a PEFT adapter into a safetensors checkpoint (or take it back out with --unmerge)
///
/// Every adapted weight becomes round(W + s·B·A) through the merge kernel (with --unmerge,
/// round(W − s·B·A); a Conv1D weight stored in × out, PEFT's fan_in_fan_out, is transposed around it); the
/// tensors of modules the adapter saved whole (PEFT's modules_to_save, e.g. a classifier head)
/// replace the base's, rounded to its dtype (--unmerge refuses such an adapter); every other tensor
/// is copied byte for byte; names, dtypes and metadata are kept. The base is a .safetensors file or
/// a sharded directory (model.safetensors.index.json and its shards), whose output is a new
/// directory. Everything is validated before anything is written and output goes through temporary
/// names, so a failure leaves no output; the base is only read.
///
/// A merge never turns an element that is finite in the base into NaN or ±Inf (as PEFT's
/// safe_merge): a NaN or Inf in lora_A or lora_B, or a merged value past the range of the weight's
/// dtype, fails the merge naming the module and the count, and nothing is written
/// (--allow-nonfinite writes it anyway). The merge kernel counts these in the merge pass itself.
/// Elements already NaN or ±Inf in the base are no error: they stay as the arithmetic leaves them
/// (an Inf plus a finite value is that Inf, a NaN stays NaN) and a warning on stderr counts them.
///
/// Progress goes to stderr: a progress bar on a terminal (modules, bytes, rate, ETA), plain lines
/// otherwise ("  [3/8] <module>: <bytes> of <total>, <rate>, ETA <t>"), nothing with --quiet. The
/// summary (and the --verify report) goes to stdout.
#[derive(Args)]
struct MergeArgs {
    /// The base checkpoint: a .safetensors file, or a directory holding model.safetensors.index.json
    /// and its shards (or a single model.safetensors)
    #[arg(long, value_name = "FILE|DIR")]
    base: PathBuf,
    /// The PEFT adapter directory (adapter_config.json and adapter_model.safetensors)
    #[arg(long, value_name = "DIR")]
    adapter: PathBuf,
    /// Where to write the merged checkpoint: a file for a file base, a new directory for a directory
    /// base; never the base itself
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
    /// Subtract the adapter instead, round(W − s·B·A): takes a merged checkpoint back to its base
    #[arg(long)]
    unmerge: bool,
    /// Where the merge kernel runs
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// After writing, check every merged element on the CPU (one more pass) and report how many
    /// are off by more than one rounding from the exact merge
    ///
    /// The exact value is x = W + s·B·A (--unmerge: W − s·B·A) computed in f64 from the base and
    /// the adapter; one rounding of it is round(x), to nearest in the output dtype (within half an
    /// ulp of x). The kernel rounds to nearest through f32 intermediates, i.e. it rounds a value
    /// within e = 2⁻²³·(|W| + (r + 3)·|s|·Σⱼ|Bᵢⱼ·Aⱼₖ|) of x (twice the first-order bound of their
    /// error), so an element is off when it is outside [round(x − e), round(x + e)]: in bf16 and
    /// f16 that is round(x) except where x lies within e of a half-way point or W and s·B·A cancel,
    /// where the neighbour on x's side passes too. A merge by the kernel has 0 elements off in
    /// every dtype. The report also counts the elements equal to round(x) and the largest distance
    /// from it in ulps. Reported on stdout; the exit status does not depend on it.
    #[arg(long)]
    verify: bool,
    /// Write the merge even where it turns finite elements of the base into NaN or ±Inf (an
    /// unchecked merge); each such module is then reported in a warning on stderr
    #[arg(long)]
    allow_nonfinite: bool,
    /// No progress output (errors, warnings and the summary are still printed)
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceChoice {
    /// CUDA device 0 when it can be used, else the CPU emulator (says which and why)
    Auto,
    /// CUDA device 0, or an error saying why it cannot be used
    Cuda,
    /// The CPU emulator (runs the same kernel source)
    Emu,
}

/// List an adapter's modules: shapes, dtype, rank, alpha and scale of each
#[derive(Args)]
struct InspectArgs {
    /// The PEFT adapter directory (adapter_config.json and adapter_model.safetensors)
    #[arg(long, value_name = "DIR")]
    adapter: PathBuf,
}

/// Plan LoRA vs full fine-tuning: trainable parameters and training memory
///
/// Trainable parameters and training memory (weights + gradients in fp16, Adam's m and v in f32) of
/// full fine-tuning and of LoRA on W_q and W_v at each rank, for a preset model or your own
/// (--layers, --d-model and --params together).
#[derive(Args)]
struct PlanArgs {
    /// A preset model [possible values: gpt3-175b]
    #[arg(long, value_name = "NAME", value_parser = preset, conflicts_with_all = ["layers", "d_model", "params"])]
    preset: Option<ModelConfig>,
    /// Transformer layers of your model (without --preset)
    #[arg(long, value_name = "L", value_parser = positive_number, required_unless_present = "preset")]
    layers: Option<u64>,
    /// Hidden size of your model (without --preset)
    #[arg(long, value_name = "D", value_parser = positive_number, required_unless_present = "preset")]
    d_model: Option<u64>,
    /// Total parameters of your model, e.g. 7e9 (without --preset)
    #[arg(long, value_name = "P", value_parser = positive_number, required_unless_present = "preset")]
    params: Option<u64>,
    /// LoRA ranks to plan for (repeat the option, or separate with commas)
    #[arg(long, value_name = "R", value_delimiter = ',', default_value = "1,4,8",
          value_parser = positive_integer)]
    rank: Vec<usize>,
}

fn preset(name: &str) -> Result<ModelConfig, String> {
    ModelConfig::preset(name).ok_or(format!("unknown preset `{name}` (known: gpt3-175b)"))
}

fn positive_integer(v: &str) -> Result<usize, String> {
    v.parse::<usize>()
        .ok()
        .filter(|&r| r >= 1)
        .ok_or("must be a positive integer".to_string())
}

/// A positive number, integer or not (`7e9`), truncated to an integer.
fn positive_number(v: &str) -> Result<u64, String> {
    v.parse::<f64>()
        .ok()
        .filter(|x| x.is_finite() && *x >= 1.0)
        .map(|x| x as u64)
        .ok_or("must be a positive number".to_string())
}

/// How a merge (or its verification) reports progress on stderr.
enum Reporter {
    /// `--quiet`.
    Silent,
    /// An indicatif bar (stderr is a terminal); `modules`: (done, total).
    Bar {
        bar: ProgressBar,
        label: &'static str,
        modules: (usize, usize),
    },
    /// Plain lines, at most one every half second plus the last (logs, CI).
    Lines(Lines),
}

struct Lines {
    label: &'static str,
    modules: (usize, usize),
    bytes: (u64, u64),
    start: Instant,
    last_print: Instant,
}

impl Reporter {
    /// `label`: empty for the merge (its lines read "  [3/8] module ..."), "verify" for the check.
    fn new(quiet: bool, label: &'static str) -> Self {
        if quiet {
            Reporter::Silent
        } else if std::io::stderr().is_terminal() {
            Reporter::Bar {
                bar: ProgressBar::hidden(),
                label,
                modules: (0, 0),
            }
        } else {
            Reporter::Lines(Lines {
                label,
                modules: (0, 0),
                bytes: (0, 0),
                start: Instant::now(),
                last_print: Instant::now(),
            })
        }
    }

    fn finish(&self) {
        if let Reporter::Bar { bar, .. } = self {
            bar.finish_and_clear();
        }
    }
}

impl Progress for Reporter {
    fn start(&mut self, modules: usize, bytes: u64) {
        match self {
            Reporter::Silent => {}
            Reporter::Bar {
                bar,
                label,
                modules: counts,
            } => {
                *counts = (0, modules);
                *bar = ProgressBar::new(bytes);
                let style = ProgressStyle::with_template(
                    "{prefix} [{wide_bar}] {binary_bytes}/{binary_total_bytes}, {binary_bytes_per_sec}, ETA {eta}",
                )
                .expect("a valid progress template")
                .progress_chars("=> ");
                bar.set_style(style);
                let what = if label.is_empty() { "merge" } else { *label };
                bar.set_prefix(format!("{what} 0/{modules} modules"));
                bar.enable_steady_tick(Duration::from_millis(200));
            }
            Reporter::Lines(l) => {
                l.modules = (0, modules);
                l.bytes = (0, bytes);
                l.start = Instant::now();
                l.last_print = Instant::now();
            }
        }
    }

    fn module_done(&mut self, module: &str, bytes: u64) {
        match self {
            Reporter::Silent => {}
            Reporter::Bar {
                bar,
                label,
                modules,
            } => {
                let what = if label.is_empty() { "merge" } else { *label };
                modules.0 += 1;
                bar.set_prefix(format!("{what} {}/{} modules", modules.0, modules.1));
                bar.inc(bytes);
            }
            Reporter::Lines(l) => {
                l.modules.0 += 1;
                l.bytes.0 += bytes;
                let last = l.modules.0 == l.modules.1;
                if last || l.last_print.elapsed() >= Duration::from_millis(500) {
                    eprintln!("{}", l.line(module));
                    l.last_print = Instant::now();
                }
            }
        }
    }
}

impl Lines {
    /// `  [3/8] module: 1.50 MiB of 4.00 MiB, 12.00 MiB/s, ETA 1s` (or `  verify [3/8] ...`).
    fn line(&self, module: &str) -> String {
        let secs = self.start.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            self.bytes.0 as f64 / secs
        } else {
            0.0
        };
        let eta = if self.modules.0 == self.modules.1 {
            String::new()
        } else if rate > 0.0 {
            let left = (self.bytes.1 - self.bytes.0) as f64 / rate;
            format!(", ETA {}", HumanDuration(Duration::from_secs_f64(left)))
        } else {
            ", ETA unknown".to_string()
        };
        let label = if self.label.is_empty() {
            String::new()
        } else {
            format!("{} ", self.label)
        };
        format!(
            "  {label}[{}/{}] {module}: {} of {}, {}/s{eta}",
            self.modules.0,
            self.modules.1,
            HumanBytes(self.bytes.0),
            HumanBytes(self.bytes.1),
            HumanBytes(rate as u64),
        )
    }
}

fn device(choice: DeviceChoice, quiet: bool) -> Result<Device, String> {
    match choice {
        DeviceChoice::Auto if quiet => Ok(Device::auto_quiet().0),
        DeviceChoice::Auto => Ok(Device::auto()),
        DeviceChoice::Emu => Ok(Device::emulator_unchecked()),
        DeviceChoice::Cuda => Device::cuda(0).map_err(|e| e.to_string()),
    }
}

fn merge(args: &MergeArgs) -> Result<(), String> {
    let (base, out) = (&args.base, &args.out);
    if out == base {
        return Err("--out must differ from --base: the base is never modified".into());
    }
    let dev = device(args.device, args.quiet)?;
    let adapter = PeftAdapter::load(&args.adapter).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut progress = Reporter::new(args.quiet, "");
    let options = MergeOptions {
        unmerge: args.unmerge,
        allow_nonfinite: args.allow_nonfinite,
    };
    let result = merge_checkpoint_with(base, &adapter, out, &dev, &options, &mut progress);
    progress.finish();
    let summary = result.map_err(|e| match e {
        lora_kernels::Error::NonFiniteMerge { .. } => {
            format!("{e} (--allow-nonfinite writes it anyway)")
        }
        e => e.to_string(),
    })?;
    for line in nonfinite_warnings(&summary, &adapter, args.unmerge) {
        eprintln!("lora-kernels: warning: {line}");
    }
    let replaced = match summary.tensors_replaced {
        0 => String::new(),
        1 => "1 tensor of a module saved whole replaced, ".to_string(),
        n => format!("{n} tensors of modules saved whole replaced, "),
    };
    println!(
        "{} {} modules into {} ({replaced}{} tensors copied unchanged, {} files, {} bytes) in {:.2} s on {}",
        if args.unmerge { "unmerged" } else { "merged" },
        summary.modules_merged,
        out.display(),
        summary.tensors_copied,
        summary.files_written,
        summary.bytes_written,
        start.elapsed().as_secs_f64(),
        dev.describe()
    );
    if args.verify {
        let start = Instant::now();
        let mut progress = Reporter::new(args.quiet, "verify");
        let result = verify_merge(base, &adapter, out, args.unmerge, &mut progress);
        progress.finish();
        let v = result.map_err(|e| format!("verifying {}: {e}", out.display()))?;
        println!("{}", verify_line(&v, args.unmerge, start.elapsed()));
    }
    Ok(())
}

/// One line per module with non-finite elements: already in the base, or (--allow-nonfinite) made by
/// the merge.
fn nonfinite_warnings(summary: &MergeSummary, adapter: &PeftAdapter, unmerge: bool) -> Vec<String> {
    let what = if unmerge { "unmerge" } else { "merge" };
    let mut lines = Vec::new();
    for (name, c) in &summary.nonfinite {
        if adapter.modules_to_save.iter().any(|t| &t.name == name) {
            lines.push(format!(
                "tensor `{name}` of a module saved whole: {} elements finite in the base are NaN or ±Inf in the adapter's ({} NaN, {} ±Inf), written because of --allow-nonfinite",
                c.created(),
                c.nan,
                c.inf
            ));
            continue;
        }
        let module = name;
        if c.in_base > 0 {
            lines.push(format!(
                "module `{module}`: {} elements of the base are NaN or ±Inf already; written as the {what} leaves them",
                c.in_base
            ));
        }
        if c.created() > 0 {
            lines.push(format!(
                "module `{module}`: {} elements finite in the base are NaN or ±Inf after the {what} ({} NaN, {} ±Inf), written because of --allow-nonfinite",
                c.created(),
                c.nan,
                c.inf
            ));
        }
    }
    lines
}

/// `verify: 0 of 40960 merged elements off by more than one rounding from the exact (f64) merge ...`
fn verify_line(v: &VerifySummary, unmerge: bool, took: Duration) -> String {
    let exact = if unmerge { "unmerge" } else { "merge" };
    let mut line = format!(
        "verify: {} of {} {}d elements off by more than one rounding from the exact (f64) {exact} \
         ({} correctly rounded, max {} ulp from it) in {:.2} s on the CPU",
        v.off,
        v.elements,
        exact,
        v.correctly_rounded,
        v.max_ulp,
        took.as_secs_f64()
    );
    if let Some(o) = &v.worst {
        line += &format!(
            "; worst: {}[{}] = {:e}, exact {:e} ({} ulp)",
            o.tensor, o.index, o.merged, o.exact, o.ulp
        );
    }
    line
}

fn inspect(args: &InspectArgs) -> Result<(), String> {
    let dir = &args.adapter;
    let a = PeftAdapter::load(dir).map_err(|e| e.to_string())?;
    let c = &a.config;
    println!(
        "adapter {}: r = {}, lora_alpha = {}, rsLoRA = {}, DoRA = {}, target_modules = {:?}",
        dir.display(),
        c.r,
        c.lora_alpha,
        c.use_rslora,
        c.use_dora,
        c.target_modules
    );
    println!("| module | A (r × in) | B (out × r) | dtype | rank | alpha | scale |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let mut bytes = 0;
    for m in &a.modules {
        bytes += m.a.bytes.len() + m.b.bytes.len();
        bytes += m.magnitude.as_ref().map_or(0, |v| v.bytes.len());
        bytes += m.base_weight.as_ref().map_or(0, |t| t.bytes.len());
        let kind = match (m.embedding, &m.base_weight) {
            (true, Some(_)) => " (embedding; its base weight saved too)",
            (true, None) => " (embedding)",
            (false, Some(_)) => " (its base weight saved too)",
            (false, None) => "",
        };
        println!(
            "| {}{kind} | {}×{} | {}×{} | {} | {} | {} | {} |",
            m.name,
            m.a.rows,
            m.a.cols,
            m.b.rows,
            m.b.cols,
            m.a.dtype,
            c.rank_for(&m.name),
            c.alpha_for(&m.name),
            c.scale_for(&m.name)
        );
    }
    if !a.modules_to_save.is_empty() {
        println!(
            "modules saved whole (modules_to_save = {:?}; a merge writes them in place of the base's):",
            c.modules_to_save
        );
        println!("| tensor | shape | dtype |");
        println!("| --- | --- | --- |");
        for t in &a.modules_to_save {
            bytes += t.bytes.len();
            println!("| {} | {:?} | {} |", t.name, t.shape, t.dtype);
        }
    }
    println!(
        "{} modules, {} trainable parameters, {} bytes of adapter tensors",
        a.modules.len(),
        a.parameters(),
        bytes
    );
    Ok(())
}

fn plan(args: &PlanArgs) -> Result<(), String> {
    let model = match (&args.preset, args.layers, args.d_model, args.params) {
        (Some(m), ..) => m.clone(),
        (None, Some(l), Some(d), Some(p)) => ModelConfig::custom(l as usize, d as usize, p),
        _ => return Err("give --preset, or --layers, --d-model and --params".into()),
    };
    // The plan's counts are u64 bytes (about 16 per parameter at most): inputs whose counts would not
    // fit, or whose products do not fit on the way, are refused, not wrapped.
    let fits = |l: u64| l.checked_add(model.total_params)?.checked_mul(16);
    let mut lora = Vec::with_capacity(args.rank.len());
    for &r in &args.rank {
        match model.lora_params(r) {
            Some(l) if fits(l).is_some() => lora.push((r, l)),
            _ => {
                return Err(format!(
                    "a model of {} parameters with {} layers of d_model {} at rank {r} is too large to plan: its byte counts overflow 64 bits",
                    model.total_params, model.layers, model.d_model
                ));
            }
        }
    }
    let p = model.total_params;
    let full = full_finetune(p, 2);
    println!(
        "{}: {} layers, d_model {}, {} parameters ({} B in fp16); LoRA on W_q and W_v; training memory = weights + gradients (fp16) + Adam state (f32 m, v)",
        model.name,
        model.layers,
        model.d_model,
        memory::human(p),
        memory::human(p * 2)
    );
    println!("| | trainable parameters | adapter (fp16) | training memory |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| full fine-tuning | {} | n/a | {} B |",
        memory::human(p),
        memory::human(full.total())
    );
    for (r, l) in lora {
        let mem = lora_finetune(p, l, 2);
        println!(
            "| LoRA r = {r} | {} | {} B | {} B |",
            memory::human(l),
            memory::human(l * 2),
            memory::human(mem.total())
        );
    }
    Ok(())
}

/// A clap usage error as one line: what is wrong, and which `--help` to read (`command`: the
/// command line's `lora-kernels <command>`, or `lora-kernels`).
fn usage_error(e: &clap::Error, command: &str) -> String {
    let quoted = |v: &ContextValue| match v {
        ContextValue::String(s) => s.clone(),
        ContextValue::Strings(s) => s.join(", "),
        other => other.to_string(),
    };
    let ctx = |k: ContextKind| e.get(k).map(quoted);
    let what = match e.kind() {
        ErrorKind::UnknownArgument => {
            let arg = ctx(ContextKind::InvalidArg).unwrap_or_default();
            let what = match arg.starts_with('-') {
                true => format!("unknown option {arg}"),
                false => format!("unexpected argument `{arg}`"),
            };
            match ctx(ContextKind::SuggestedArg) {
                Some(s) => format!("{what} (did you mean {s}?)"),
                None => what,
            }
        }
        ErrorKind::InvalidSubcommand => {
            let cmd = ctx(ContextKind::InvalidSubcommand).unwrap_or_default();
            format!("unknown command `{cmd}`: the commands are merge, inspect, plan and help")
        }
        ErrorKind::MissingRequiredArgument => {
            format!(
                "missing {}",
                ctx(ContextKind::InvalidArg).unwrap_or_default()
            )
        }
        _ => {
            // clap's own words, its lines up to "Usage:" or "For more information" joined into one.
            let rendered = e.render().to_string();
            let lines: Vec<&str> = rendered
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            lines.join(" ").trim_start_matches("error: ").to_string()
        }
    };
    format!("{what} (see `{command} --help`)")
}

fn main() -> ExitCode {
    let parsed = Cli::try_parse();
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    ExitCode::SUCCESS
                }
                // no arguments at all: the help, on stderr
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    let _ = e.print();
                    ExitCode::from(2)
                }
                _ => {
                    let sub = std::env::args()
                        .nth(1)
                        .filter(|a| ["merge", "inspect", "plan"].contains(&a.as_str()));
                    let command = match sub {
                        Some(sub) => format!("lora-kernels {sub}"),
                        None => "lora-kernels".to_string(),
                    };
                    eprintln!("lora-kernels: error: {}", usage_error(&e, &command));
                    ExitCode::from(2)
                }
            };
        }
    };
    let result = match &cli.command {
        Command::Merge(a) => merge(a),
        Command::Inspect(a) => inspect(a),
        Command::Plan(a) => plan(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("lora-kernels: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn plain_progress_line() {
        let l = Lines {
            label: "",
            modules: (3, 8),
            bytes: (3 << 20, 8 << 20),
            start: Instant::now() - Duration::from_secs(3),
            last_print: Instant::now(),
        };
        let line = l.line("model.layers.0.mlp.up_proj");
        assert!(
            line.starts_with("  [3/8] model.layers.0.mlp.up_proj: 3.00 MiB of 8.00 MiB, "),
            "{line}"
        );
        assert!(line.contains("/s, ETA "), "{line}");
    }
}
