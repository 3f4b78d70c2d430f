# Sourced by cross/build and cross/check: per-target toolchain settings.

# cross_env aarch64|armv7: sets TARGET, TRIPLE, DEB_ARCH, QEMU and the cargo/cc variables.
cross_env() {
  case "$1" in
    aarch64) TARGET=aarch64-unknown-linux-gnu; TRIPLE=aarch64-linux-gnu; DEB_ARCH=arm64; QEMU=qemu-aarch64-static ;;
    armv7) TARGET=armv7-unknown-linux-gnueabihf; TRIPLE=arm-linux-gnueabihf; DEB_ARCH=armhf; QEMU=qemu-arm-static ;;
    *) echo "unknown target $1 (aarch64 or armv7)" >&2; return 64 ;;
  esac
  local t=${TARGET//-/_}
  local T=${t^^}
  export "CC_$t=$TRIPLE-gcc" "CXX_$t=$TRIPLE-g++" "AR_$t=$TRIPLE-ar"
  export "CARGO_TARGET_${T}_LINKER=$TRIPLE-gcc"
  # -L /: the multiarch libc6:<arch> (pulled in by libudev-dev:<arch>) with its own
  # loader. The cross sysroot's loader (/usr/$TRIPLE) with the multiarch libc mixes two
  # glibc builds, and threads then spin forever in pthread_create under qemu.
  export "CARGO_TARGET_${T}_RUNNER=$QEMU -L /"
  # C code (librdkafka, OpenSSL) in per-function sections, optimised for size, so the
  # linker drops what labgate never calls: the gateway binary stays small.
  export "CFLAGS_$t=-Os -ffunction-sections -fdata-sections" CFLAGS="-Os -ffunction-sections -fdata-sections"
  export "CXXFLAGS_$t=-Os -ffunction-sections -fdata-sections" CXXFLAGS="-Os -ffunction-sections -fdata-sections"
  # librdkafka's ./configure reads the plain names.
  export CC="$TRIPLE-gcc" CXX="$TRIPLE-g++" AR="$TRIPLE-ar" RANLIB="$TRIPLE-ranlib"
  # pkg-config finds the target's libudev and libssl (multiarch), not the host's.
  export PKG_CONFIG_ALLOW_CROSS=1 PKG_CONFIG_SYSROOT_DIR=/
  export PKG_CONFIG_LIBDIR="/usr/lib/$TRIPLE/pkgconfig:/usr/share/pkgconfig"
}

# on_host CMD…: runs CMD in a subshell without the settings cross_env gives under plain
# names (compilers, flags, pkg-config's search path), which would send a host build
# looking for the target's libraries.
on_host() {
  (unset CC CXX AR RANLIB CFLAGS CXXFLAGS PKG_CONFIG_ALLOW_CROSS PKG_CONFIG_SYSROOT_DIR \
    PKG_CONFIG_LIBDIR; "$@")
}

ensure_cross_packages() {
  # OpenSSL is built from source (feature vendored-openssl): no libssl-dev:<arch>.
  local pkgs=("gcc-$TRIPLE" "g++-$TRIPLE" "binutils-$TRIPLE" "libudev-dev:$DEB_ARCH" "libc6:$DEB_ARCH" qemu-user-static perl make file)
  local missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    log "installing cross packages: ${missing[*]}"
    dpkg --print-foreign-architectures | grep -qx "$DEB_ARCH" || $sudo dpkg --add-architecture "$DEB_ARCH"
    # A mirror mid-sync can fail one index; the install below says if that mattered.
    $sudo apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}
