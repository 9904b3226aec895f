//! Links the C++ standard library when RocksDB comes prebuilt
//! (`ROCKSDB_LIB_DIR`, as `scripts/release.sh` sets it): librocksdb-sys
//! links it only when it compiles RocksDB itself.

fn main() {
    println!("cargo:rerun-if-env-changed=ROCKSDB_LIB_DIR");
    if std::env::var_os("ROCKSDB_LIB_DIR").is_some() {
        println!("cargo:rustc-link-lib=dylib=stdc++");
    }
}
