# Shared by the bench scripts (sourced).

CLK_TCK=$(getconf CLK_TCK)

# Total user+system CPU ticks (CLK_TCK per second) of the given pids.
cpu_ticks() {
  local sum=0
  for p in "$@"; do
    local s
    s=$(cut -d' ' -f14,15 "/proc/$p/stat" 2>/dev/null || echo "0 0")
    sum=$((sum + ${s% *} + ${s#* }))
  done
  echo $sum
}
