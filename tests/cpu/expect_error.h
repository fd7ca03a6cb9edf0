#pragma once
// Asserts that fn throws E and that the message contains every fragment: our
// errors must name the value, the rule and the fix, so tests check the words.
#include <gtest/gtest.h>

#include <initializer_list>
#include <string>

namespace dsa::test {

template <class E, class Fn>
void expect_error(Fn fn, std::initializer_list<const char*> fragments) {
  try {
    fn();
    ADD_FAILURE() << "expected an exception";
  } catch (const E& e) {
    const std::string msg = e.what();
    for (const char* f : fragments) EXPECT_NE(msg.find(f), std::string::npos) << "message lacks '" << f << "': " << msg;
  }
}

}  // namespace dsa::test
