//! `lora-kernels`: merge PEFT adapters into checkpoints, inspect adapters, plan LoRA memory.
//!
//!   lora-kernels merge --base <file.safetensors | dir> --adapter <dir> --out <path> [--unmerge]
//!                      [--device auto|cuda|emu]
//!   lora-kernels inspect --adapter <dir>
//!   lora-kernels plan (--preset gpt3-175b | --layers L --d-model D --params P) [--rank r]...
//!
//! Errors print one clear line and exit non-zero; a failed merge leaves no output and never touches
//! the base.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use lora_kernels::Device;
use lora_kernels::checkpoint::merge_checkpoint;
use lora_kernels::memory::{self, ModelConfig, full_finetune, lora_finetune};
use lora_kernels::peft::PeftAdapter;

const USAGE: &str = "usage:
  lora-kernels merge --base <file.safetensors | dir> --adapter <dir> --out <path> [--unmerge] [--device auto|cuda|emu]
  lora-kernels inspect --adapter <dir>
  lora-kernels plan (--preset gpt3-175b | --layers <L> --d-model <D> --params <P>) [--rank <r>]...";

/// `--name value` pairs and bare `--flag`s.
struct Args {
    values: Vec<(String, String)>,
    flags: Vec<String>,
}

impl Args {
    fn parse(raw: &[String], flags: &[&str]) -> Result<Self, String> {
        let (mut values, mut found) = (Vec::new(), Vec::new());
        let mut it = raw.iter();
        while let Some(a) = it.next() {
            let Some(name) = a.strip_prefix("--") else {
                return Err(format!("unexpected argument `{a}`"));
            };
            if flags.contains(&name) {
                found.push(name.to_string());
            } else {
                let v = it.next().ok_or(format!("--{name} needs a value"))?;
                values.push((name.to_string(), v.clone()));
            }
        }
        Ok(Args {
            values,
            flags: found,
        })
    }
    fn get(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    fn all(&self, name: &str) -> Vec<&str> {
        self.values
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
    fn need(&self, name: &str) -> Result<&str, String> {
        self.get(name).ok_or(format!("missing --{name}"))
    }
    fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f == name)
    }
    fn check_known(&self, known: &[&str]) -> Result<(), String> {
        match self
            .values
            .iter()
            .find(|(n, _)| !known.contains(&n.as_str()))
        {
            Some((n, _)) => Err(format!("unknown option --{n}")),
            None => Ok(()),
        }
    }
}

fn device(choice: &str) -> Result<Device, String> {
    match choice {
        "auto" => Ok(Device::auto()),
        "emu" => Ok(Device::emulator()),
        "cuda" => Device::cuda(0).map_err(|e| e.to_string()),
        other => Err(format!("--device must be auto, cuda or emu, not `{other}`")),
    }
}

fn merge(args: &Args) -> Result<(), String> {
    args.check_known(&["base", "adapter", "out", "device"])?;
    let base = PathBuf::from(args.need("base")?);
    let adapter_dir = PathBuf::from(args.need("adapter")?);
    let out = PathBuf::from(args.need("out")?);
    if out == base {
        return Err("--out must differ from --base: the base is never modified".into());
    }
    let unmerge = args.flag("unmerge");
    let dev = device(args.get("device").unwrap_or("auto"))?;
    let adapter = PeftAdapter::load(&adapter_dir).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut last_print = Instant::now();
    let summary = merge_checkpoint(
        &base,
        &adapter,
        &out,
        &dev,
        unmerge,
        &mut |done, total, name| {
            if done == total || last_print.elapsed().as_millis() > 500 {
                eprintln!("  [{done}/{total}] {name}");
                last_print = Instant::now();
            }
        },
    )
    .map_err(|e| e.to_string())?;
    println!(
        "{} {} modules into {} ({} tensors copied unchanged, {} files, {} bytes) in {:.2} s on {}",
        if unmerge { "unmerged" } else { "merged" },
        summary.modules_merged,
        out.display(),
        summary.tensors_copied,
        summary.files_written,
        summary.bytes_written,
        start.elapsed().as_secs_f64(),
        dev.describe()
    );
    Ok(())
}

fn inspect(args: &Args) -> Result<(), String> {
    args.check_known(&["adapter"])?;
    let dir = PathBuf::from(args.need("adapter")?);
    let a = PeftAdapter::load(&dir).map_err(|e| e.to_string())?;
    let c = &a.config;
    println!(
        "adapter {}: r = {}, lora_alpha = {}, rsLoRA = {}, target_modules = {:?}",
        dir.display(),
        c.r,
        c.lora_alpha,
        c.use_rslora,
        c.target_modules
    );
    println!("| module | A (r × in) | B (out × r) | dtype | rank | alpha | scale |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let mut bytes = 0;
    for m in &a.modules {
        bytes += m.a.bytes.len() + m.b.bytes.len();
        println!(
            "| {} | {}×{} | {}×{} | {} | {} | {} | {} |",
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
    println!(
        "{} modules, {} trainable parameters, {} bytes of adapter tensors",
        a.modules.len(),
        a.parameters(),
        bytes
    );
    Ok(())
}

fn plan(args: &Args) -> Result<(), String> {
    args.check_known(&["preset", "layers", "d-model", "params", "rank"])?;
    let num = |name: &str| -> Result<u64, String> {
        let v = args.need(name)?;
        v.parse::<f64>()
            .ok()
            .filter(|x| x.is_finite() && *x >= 1.0)
            .map(|x| x as u64)
            .ok_or(format!("--{name} must be a positive number, not `{v}`"))
    };
    let model = match args.get("preset") {
        Some(p) => {
            ModelConfig::preset(p).ok_or(format!("unknown preset `{p}` (known: gpt3-175b)"))?
        }
        None => ModelConfig::custom(
            num("layers")? as usize,
            num("d-model")? as usize,
            num("params")?,
        ),
    };
    let mut ranks = Vec::new();
    for r in args.all("rank") {
        ranks.push(
            r.parse::<usize>()
                .ok()
                .filter(|&r| r >= 1)
                .ok_or(format!("--rank must be a positive integer, not `{r}`"))?,
        );
    }
    if ranks.is_empty() {
        ranks = vec![1, 4, 8];
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
    for r in ranks {
        let l = model.lora_params(r);
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

fn main() -> ExitCode {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = raw.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let result = match cmd.as_str() {
        "merge" => Args::parse(rest, &["unmerge"]).and_then(|a| merge(&a)),
        "inspect" => Args::parse(rest, &[]).and_then(|a| inspect(&a)),
        "plan" => Args::parse(rest, &[]).and_then(|a| plan(&a)),
        "--help" | "-h" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command `{other}`\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("lora-kernels: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
