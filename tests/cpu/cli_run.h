#pragma once
// Runs the built `dsa` binary (DSA_CLI_PATH) and captures its exit code,
// stdout and stderr, for the command-line tests.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <string>

namespace dsa::test {

struct CliResult {
  int rc = -1;
  std::string out, err;
};

inline std::string slurp(const std::string& path) {
  std::ifstream f(path);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// `args` go through the shell (quote accordingly). A run that does not end
// within `timeout_s` seconds is killed and reads as rc 124.
inline CliResult run_dsa(const std::string& args, int timeout_s = 120) {
  const std::string err_path = testing::TempDir() + "dsa_cli_stderr_" + std::to_string(getpid()) + ".txt";
  // One thread: these runs check behaviour, and a busy machine makes OpenMP barriers slow.
  const std::string cmd = "OMP_NUM_THREADS=1 timeout " + std::to_string(timeout_s) + " " + std::string(DSA_CLI_PATH) + " " + args +
                          " 2>" + err_path;
  CliResult r;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) {
    ADD_FAILURE() << "popen failed: " << cmd;
    return r;
  }
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  const int status = pclose(p);
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.err = slurp(err_path);
  std::remove(err_path.c_str());
  return r;
}

// Exit code `rc` (1: usage or input error; README) and a message on stderr,
// starting "error: ", that holds every fragment.
inline CliResult expect_rejected(const std::string& args, std::initializer_list<const char*> fragments, int rc = 1) {
  const CliResult r = run_dsa(args);
  EXPECT_EQ(r.rc, rc) << "dsa " << args << "\nstdout: " << r.out << "\nstderr: " << r.err;
  // The error comes last, after any per-combination skip lines.
  EXPECT_TRUE(r.err.rfind("error: ", 0) == 0 || r.err.find("\nerror: ") != std::string::npos) << r.err;
  for (const char* f : fragments) EXPECT_NE(r.err.find(f), std::string::npos) << "dsa " << args << ": stderr lacks '" << f << "': " << r.err;
  return r;
}

}  // namespace dsa::test
