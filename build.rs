//! Rebuilds when a migration changes: `sqlx::migrate!` embeds `migrations/`
//! at compile time, and Cargo does not track those files by itself.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
