// jest for the pure state logic (src/model.ts), compiled by ts-jest; the widgets are tested in
// a real browser (tests/lab/).
module.exports = {
  preset: 'ts-jest',
  testEnvironment: 'node',
  modulePathIgnorePatterns: ['<rootDir>/wheel-data/', '<rootDir>/lib/'],
  testRegex: 'src/__tests__/.*\\.spec\\.ts$',
  transform: { '^.+\\.ts$': ['ts-jest', { tsconfig: { types: ['jest'], noUnusedLocals: false } }] }
};
