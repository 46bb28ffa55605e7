//! Load-test harness for Turnstile. The scenarios, the open-model scheduler and the reports arrive with
//! the load-test issue; until then this binary only says so, so that the workspace layout is final.

fn main() {
    eprintln!("loadtest: no scenarios yet; see the load-test issue");
    std::process::exit(2);
}
